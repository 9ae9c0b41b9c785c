"""IRC numeric replies (RFC 1459/2812). str() of a member is its wire form."""
from __future__ import annotations

import enum


class _Numeric(str, enum.Enum):
    def __str__(self) -> str:
        return self.value


class RPL(_Numeric):
    WELCOME = "001"
    YOURHOST = "002"
    CREATED = "003"
    MYINFO = "004"
    ISUPPORT = "005"
    UMODEIS = "221"
    WHOISUSER = "311"
    WHOISSERVER = "312"
    ENDOFWHO = "315"
    WHOISIDLE = "317"
    ENDOFWHOIS = "318"
    WHOISCHANNELS = "319"
    USERHOST = "302"
    LIST = "322"
    LISTEND = "323"
    CHANNELMODEIS = "324"
    NOTOPIC = "331"
    TOPIC = "332"
    TOPICWHOTIME = "333"
    NAMREPLY = "353"
    ENDOFNAMES = "366"
    ENDOFWHOWAS = "369"
    ENDOFBANLIST = "368"
    MOTD = "372"
    MOTDSTART = "375"
    ENDOFMOTD = "376"


class ERR(_Numeric):
    NOSUCHNICK = "401"
    NOSUCHSERVER = "402"
    NOSUCHCHANNEL = "403"
    CANNOTSENDTOCHAN = "404"
    WASNOSUCHNICK = "406"
    TOOMANYCHANNELS = "405"
    NOORIGIN = "409"
    UNKNOWNCOMMAND = "421"
    NOMOTD = "422"
    NONICKNAMEGIVEN = "431"
    ERRONEUSNICKNAME = "432"
    NICKNAMEINUSE = "433"
    NOTONCHANNEL = "442"
    NOTREGISTERED = "451"
    NEEDMOREPARAMS = "461"
    ALREADYREGISTRED = "462"
    UNKNOWNMODE = "472"
    CHANOPRIVSNEEDED = "482"
    USERSDONTMATCH = "502"
