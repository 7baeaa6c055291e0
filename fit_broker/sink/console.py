"""
The live web console of the sink process, served by C{twisted.web}.

It is a client of the cluster like any other: it shows the voted events
its client identity may read (the channels the sink subscribes to) and
the state of its links to the replicas, never a replica's queues.

    /             the page (HTML; script and style are separate files)
    /health       JSON: replicas' links, channels, the sinks' counters
    /events?channel=TAG
                  Server-Sent Events: the channel's recent events, then
                  each new one as JSON (the object `fitbroker tail` prints)

Event content is written by publishers, so it is attacker-controlled: the
page puts every value in with C{textContent}, a Content-Security-Policy
forbids inline script, and what the server renders itself is escaped.
Requests whose Host header is not allowed are refused, so that a web page
cannot reach a loopback console through DNS rebinding.
"""

import html
import json
from collections import deque

from twisted.application.internet import TimerService
from twisted.application.service import MultiService
from twisted.internet.endpoints import serverFromString
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Site
from zope.interface import implementer

from fit_broker.cli import event_json
from fit_broker.errors import ConfigError
from fit_broker.listening import MustListen

#: Seconds between comments that keep idle event streams open through proxies.
KEEPALIVE = 15.0

#: Events a viewer may have waiting in its connection's buffer before new
#: ones are dropped for it (and counted).
VIEWER_MAX_BYTES = 1024 * 1024

_HEADERS = {
    b"content-security-policy": b"default-src 'none'; script-src 'self'; style-src 'self'; "
    b"connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    b"frame-ancestors 'none'",
    b"x-content-type-options": b"nosniff",
    b"referrer-policy": b"no-referrer",
    b"cache-control": b"no-store",
}


class ConsoleHub:
    """
    Keeps the most recent events of each channel and hands new ones to the
    viewers of that channel.  Sans-IO: viewers are objects with C{send(bytes)}.

    @ivar dropped: events not sent to a viewer whose connection was full.
    """

    def __init__(self, channels, recent=100):
        self.channels = tuple(channels)
        self.recent = {tag: deque(maxlen=recent) for tag in self.channels}
        self.viewers = {tag: set() for tag in self.channels}
        self.dropped = 0

    def publish(self, tag, events):
        """
        Take a group of C{events} of channel C{tag} (a sink client observer).
        """
        recent = self.recent.get(tag)
        if recent is None:
            return
        messages = [sse_message(event_json(tag, event)) for event in events]
        recent.extend(messages)
        for viewer in list(self.viewers[tag]):
            for message in messages:
                if not viewer.send(message):
                    self.dropped += 1

    def join(self, tag, viewer):
        """
        Add C{viewer} to channel C{tag} and send it the recent events.
        """
        self.viewers[tag].add(viewer)
        for message in self.recent[tag]:
            viewer.send(message)

    def leave(self, tag, viewer):
        self.viewers[tag].discard(viewer)

    def keepalive(self):
        for viewers in self.viewers.values():
            for viewer in list(viewers):
                viewer.send(b": keepalive\n\n")

    def viewer_count(self):
        return sum(len(v) for v in self.viewers.values())


def sse_message(data):
    """
    Return C{data} (text) as one Server-Sent Events message; each line of
    it becomes a C{data:} field, so no content can end the message early.
    """
    lines = data.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "".join(f"data: {line}\n" for line in lines).encode("utf-8") + b"\n"


def host_allowed(host, allowed):
    """
    Whether the Host header C{host} (bytes or C{None}) names one of C{allowed}.
    """
    if not host:
        return False
    name = host.decode("ascii", "replace").strip().lower()
    if name.startswith("["):
        name = name[: name.find("]") + 1]
    else:
        name = name.rsplit(":", 1)[0]
    return name in allowed


def _secure(request, content_type):
    for name, value in _HEADERS.items():
        request.setHeader(name, value)
    request.setHeader(b"content-type", content_type)


@implementer(IPushProducer)
class _Viewer:
    """
    One browser tailing a channel: writes while its connection keeps up.
    """

    def __init__(self, request):
        self.request = request
        self.paused = False
        request.registerProducer(self, True)

    def send(self, message):
        if self.paused:
            return False
        self.request.write(message)
        return True

    def pauseProducing(self):
        self.paused = True

    def resumeProducing(self):
        self.paused = False

    def stopProducing(self):
        self.paused = True


class _Events(Resource):
    isLeaf = True

    def __init__(self, hub):
        super().__init__()
        self.hub = hub

    def render_GET(self, request):
        tag = (request.args.get(b"channel") or [b""])[0].decode("utf-8", "replace")
        if tag not in self.hub.channels:
            _secure(request, b"application/json")
            request.setResponseCode(404)
            return json.dumps({"error": "no such channel here", "channels": list(self.hub.channels)}).encode()
        _secure(request, b"text/event-stream; charset=utf-8")
        request.write(b"retry: 2000\n\n")
        viewer = _Viewer(request)
        self.hub.join(tag, viewer)

        def gone(_):
            self.hub.leave(tag, viewer)
            viewer.paused = True

        request.notifyFinish().addBoth(gone)
        return NOT_DONE_YET


class _Health(Resource):
    isLeaf = True

    def __init__(self, client, hub):
        super().__init__()
        self.client = client
        self.hub = hub

    def render_GET(self, request):
        _secure(request, b"application/json")
        health = self.client.health()
        health["console"] = {"viewers": self.hub.viewer_count(), "dropped": self.hub.dropped}
        return json.dumps(health, sort_keys=True).encode("utf-8")


class _Static(Resource):
    isLeaf = True

    def __init__(self, body, content_type):
        super().__init__()
        self.body = body
        self.content_type = content_type

    def render_GET(self, request):
        _secure(request, self.content_type)
        return self.body


class _Root(Resource):
    """
    Serves the page and its parts, after checking the Host header.
    """

    def __init__(self, children, allowed_hosts):
        super().__init__()
        self.allowed_hosts = frozenset(allowed_hosts)
        self.named = children

    def getChildWithDefault(self, path, request):
        if not host_allowed(request.getHeader(b"host"), self.allowed_hosts):
            return _Refused()
        return self.named.get(path, _NotFound())

    def render_GET(self, request):
        if not host_allowed(request.getHeader(b"host"), self.allowed_hosts):
            return _Refused().render(request)
        return self.named[b""].render(request)


class _Refused(Resource):
    isLeaf = True

    def render(self, request):
        _secure(request, b"text/plain; charset=utf-8")
        request.setResponseCode(421)
        return b"this console answers to its configured host names only\n"


class _NotFound(Resource):
    isLeaf = True

    def render(self, request):
        _secure(request, b"text/plain; charset=utf-8")
        request.setResponseCode(404)
        return b"not found\n"


def render_page(title, channels):
    """
    Return the console page for C{channels}; every value is escaped.
    """
    options = "\n".join(
        f'        <option value="{html.escape(tag, quote=True)}">{html.escape(tag)}</option>'
        for tag in channels
    )
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>{html.escape(title)}</title>
  <link rel="stylesheet" href="console.css">
  <script src="console.js" defer></script>
</head>
<body>
  <h1>{html.escape(title)}</h1>
  <section>
    <h2>Replicas</h2>
    <table id="replicas"><thead><tr><th>replica</th><th>address</th><th>link</th></tr></thead>
      <tbody></tbody></table>
    <p id="sinks"></p>
  </section>
  <section>
    <h2>Live tail</h2>
    <label>Channel
      <select id="channel">
{options}
      </select>
    </label>
    <span id="stream-state">connecting</span>
    <table id="tail"><thead><tr><th>time (UTC)</th><th>publisher</th><th>event id</th>
      <th>urgency</th><th>content</th></tr></thead><tbody id="events"></tbody></table>
  </section>
</body>
</html>
""".encode("utf-8")


CONSOLE_JS = b"""\
"use strict";
// Every value from the server goes in with textContent: event content is
// written by publishers and must never be parsed as HTML.
const MAX_ROWS = 500;
let source = null;

function cell(row, text) {
  const td = document.createElement("td");
  td.textContent = text;
  row.appendChild(td);
}

function when(seconds) {
  return Number.isFinite(seconds) ? new Date(seconds * 1000).toISOString() : "-";
}

function show(record) {
  const row = document.createElement("tr");
  row.className = "event";
  cell(row, when(record.timestamp));
  cell(row, String(record.publisher));
  cell(row, String(record.event_id));
  cell(row, String(record.urgency));
  cell(row, record.content !== null ? String(record.content) : "(binary, base64) " + record.content_b64);
  const list = document.getElementById("events");
  list.prepend(row);
  while (list.children.length > MAX_ROWS) list.lastChild.remove();
}

function tail(channel) {
  if (source !== null) source.close();
  document.getElementById("events").replaceChildren();
  const state = document.getElementById("stream-state");
  state.textContent = "connecting";
  source = new EventSource("events?channel=" + encodeURIComponent(channel));
  source.onopen = () => { state.textContent = "live"; };
  source.onerror = () => { state.textContent = "reconnecting"; };
  source.onmessage = (message) => {
    try { show(JSON.parse(message.data)); } catch (e) { /* not an event */ }
  };
}

async function health() {
  let data;
  try {
    const response = await fetch("health", {cache: "no-store"});
    data = await response.json();
  } catch (e) {
    document.getElementById("sinks").textContent = "the sink process does not answer";
    return;
  }
  const body = document.querySelector("#replicas tbody");
  body.replaceChildren();
  for (const replica of data.replicas) {
    const row = document.createElement("tr");
    row.className = replica.linked ? "up" : "down";
    cell(row, String(replica.index));
    cell(row, String(replica.connect));
    cell(row, replica.linked ? "linked" : (replica.refused ? "refused: " + replica.refused : "down"));
    body.appendChild(row);
  }
  const sinks = Object.entries(data.sinks).map(([name, c]) =>
    name + ": " + c.state + ", " + c.forwarded + " forwarded, " + c.held + " held, " +
    c.retried + " retried, " + c["repeats-possible"] + " possibly repeated");
  document.getElementById("sinks").textContent = sinks.join("; ");
}

document.addEventListener("DOMContentLoaded", () => {
  const select = document.getElementById("channel");
  const wanted = new URLSearchParams(location.search).get("channel");
  if (wanted !== null && Array.from(select.options).some((o) => o.value === wanted)) {
    select.value = wanted;
  }
  select.addEventListener("change", () => tail(select.value));
  if (select.value) tail(select.value);
  health();
  setInterval(health, 2000);
});
"""

CONSOLE_CSS = b"""\
body { font-family: system-ui, sans-serif; margin: 1.5em; }
table { border-collapse: collapse; margin: 0.5em 0; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.5em; text-align: left; vertical-align: top; }
#tail td:last-child { white-space: pre-wrap; word-break: break-all; font-family: monospace; }
tr.up td:last-child { color: #060; }
tr.down td:last-child { color: #a00; }
#stream-state { margin-left: 1em; color: #555; }
"""


def make_console_site(spec, client, hub, title):
    """
    Return the console's L{Site} over C{client} (a
    L{fit_broker.sink.service.SinkClient}) and C{hub}.
    """
    page = _Static(render_page(title, hub.channels), b"text/html; charset=utf-8")
    children = {
        b"": page,
        b"console.js": _Static(CONSOLE_JS, b"text/javascript; charset=utf-8"),
        b"console.css": _Static(CONSOLE_CSS, b"text/css; charset=utf-8"),
        b"health": _Health(client, hub),
        b"events": _Events(hub),
    }
    site = Site(_Root(children, spec.allowed_hosts))
    site.displayTracebacks = False
    site.noisy = False
    return site


_LOOPBACK = ("127.", "::1", "localhost")


def console_service(spec, client, reactor):
    """
    Return the console as a service: its listener and its keep-alive timer.
    The service has a C{hub} attribute.

    @raise ConfigError: when C{spec.listen} is not an endpoint string.
    """
    log = Logger()
    hub = ConsoleHub(client.settings.console_channels(), spec.recent)
    client.observers.append(hub.publish)
    site = make_console_site(spec, client, hub, f"FIT Broker sink: {client.cluster.name}")
    try:
        endpoint = serverFromString(reactor, spec.listen)
    except (ValueError, TypeError, KeyError) as e:
        raise ConfigError(f"[console.listen]: invalid endpoint {spec.listen!r}: {e}") from None
    interface = getattr(endpoint, "_interface", "")
    if not interface.startswith(_LOOPBACK):
        log.warn(
            "the console listens on {listen}, beyond this host: it has no login, "
            "anyone who reaches it reads the events",
            listen=spec.listen,
        )
    service = MultiService()
    listener = MustListen(endpoint, site)
    listener.prefix = "fitbroker-sink"
    listener.setServiceParent(service)
    timer = TimerService(KEEPALIVE, hub.keepalive)
    timer.clock = reactor
    timer.setServiceParent(service)
    service.hub = hub
    return service
