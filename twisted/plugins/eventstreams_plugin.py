from twisted.application.service import ServiceMaker

EventStreams = ServiceMaker(
    "EventStreams",
    "eventstreams.tap",
    "Streams of JSON events over HTTP Server-Sent Events, IRC and Socket.IO",
    "eventstreams",
)
