/*
 * martd browser library: subscribe to and publish on martd channels.
 * Plain ES5 and XMLHttpRequest: no build step, works in old browsers.
 *
 *   martd.SERVER = "";            origin of the server ("" = this page's)
 *   martd.SUB = "/sub";           a `martd_listen json` location
 *   martd.PUB = "/pub";           a `martd_push json` location
 *   martd.cid                     a random id of this page load
 *   martd.EVENTSOURCE = true;     listen over EventSource where the browser has it
 *   martd.transport               "eventsource" or "longpoll": how it listens now
 *
 *   var h = martd.sub(channel, function (payload, channel, etag) { ... }, etag);
 *   h.cancel();
 *       payload: the message as a string (a binary message as a binary string).
 *       etag: optional, "0" (the default) = every message the channel stores; the callback's
 *       etag is that of the last message of the reply it came in, to resume from later.
 *       All subscriptions share one request: an EventSource stream where the browser has
 *       EventSource and the location offers it (`martd_listen json longpoll eventsource`),
 *       else a long-poll over XMLHttpRequest. A stream that fails before it opens (the
 *       location does not offer EventSource) turns this page to long-polls. A second sub on a
 *       channel already subscribed to joins it where it is. A failed poll or an ended stream
 *       (network error, an HTTP error, a broken reply, nginx reload) is retried after 0.5 s,
 *       doubling up to 30 s while it keeps failing (each wait jittered between half and all
 *       of that), resuming after the last message each channel got; an empty reply (listener
 *       timeout, nginx reload) is followed by the next poll at once.
 *
 *   martd.pub(channel, payload, {key: K, size: N, life: S, one2one: true}, function (err, etag) { ... });
 *       options and callback are optional; err is null or the server's reason ("HTTP 502"
 *       when it gave none).
 */
var martd = (function () {
    "use strict";

    var BACKOFF_MIN = 500, BACKOFF_MAX = 30000;
    var m = { SERVER: "", SUB: "/sub", PUB: "/pub", EVENTSOURCE: true, transport: null };
    var channels = {};      // encoded channel name -> {name, etag, subs: [{f: callback}, ...]}
    var poll = null;        // the XMLHttpRequest of the long-poll, or the EventSource, under way
    var noEvents = false;   // an EventSource failed before it opened: long-poll from now on
    var timer = null;       // the pending start of the next long-poll
    var failures = 0;       // long-polls failed in a row
    var seq = 0;            // the `_` argument: no cache ever answers a long-poll

    m.cid = new Date().getTime().toString(36) + Math.random().toString(36).slice(2, 10);

    function enc(s) {
        return encodeURIComponent(String(s));
    }

    function has(o, k) {
        return Object.prototype.hasOwnProperty.call(o, k);
    }

    // Calls f(a...) so that an exception in it is reported but stops nothing here.
    function safely(f, a, b, c) {
        try {
            f(a, b, c);
        } catch (e) {
            setTimeout(function () { throw e; }, 0);
        }
    }

    function parse(text) {
        try {
            return JSON.parse(text);
        } catch (e) {
            return null;
        }
    }

    function decode(item) {
        return typeof item === "string" ? item : atob(item.base64);
    }

    // (Re)starts the long-poll after `delay` ms, dropping the one under way.
    function restart(delay) {
        if (timer !== null) {
            clearTimeout(timer);
        }
        if (poll !== null) {
            var old = poll;
            poll = null;
            if (old.close) {
                old.close();
            } else {
                old.abort();
            }
        }
        timer = setTimeout(listen, delay);
    }

    function backoff() {
        var d = Math.min(BACKOFF_MAX, BACKOFF_MIN * Math.pow(2, failures));
        failures++;
        restart(d / 2 + Math.random() * d / 2);
    }

    function deliver(reply) {
        var key, ch, got, i, j, subs;
        for (key in reply.channels) {
            if (!has(reply.channels, key) || !has(channels, key)) {
                continue;
            }
            ch = channels[key];
            got = reply.channels[key];
            ch.etag = got.etag;
            subs = ch.subs.slice();
            for (i = 0; i < got.payload.length; i++) {
                for (j = 0; j < subs.length; j++) {
                    if (subs[j].f) {
                        safely(subs[j].f, decode(got.payload[i]), ch.name, got.etag);
                    }
                }
            }
        }
    }

    function valid(reply) {
        return reply !== null && typeof reply.channels === "object" && reply.channels !== null;
    }

    // One EventSource stream for every subscribed channel: each event is one message in the
    // long-poll reply's envelope. It is never left to reconnect by itself: a new stream asks
    // from the etags got so far.
    function stream(url) {
        var s = poll = new EventSource(url), opened = false;
        m.transport = "eventsource";
        s.onopen = function () {
            opened = true;
            failures = 0;
        };
        s.onmessage = function (e) {
            var reply = parse(e.data);
            if (s === poll && valid(reply)) {
                deliver(reply);
            }
        };
        s.onerror = function () {
            if (s !== poll) {
                return;
            }
            poll = null;
            s.close();
            if (opened) {
                backoff();
            } else {
                // refused (not an event stream here) or unreachable: long-polls will tell
                noEvents = true;
                restart(0);
            }
        };
    }

    // The transport: one request for every subscribed channel, EventSource or a long-poll over
    // XMLHttpRequest.
    function listen() {
        var args = [], key, x, url;
        timer = null;
        for (key in channels) {
            if (has(channels, key)) {
                args.push(key + "=" + enc(channels[key].etag));
            }
        }
        if (!args.length) {
            return;
        }
        url = m.SERVER + m.SUB + "?cid=" + enc(m.cid) + "&" + args.join("&");
        if (m.EVENTSOURCE && !noEvents && typeof EventSource !== "undefined") {
            stream(url);
            return;
        }
        seq++;
        m.transport = "longpoll";
        x = poll = new XMLHttpRequest();
        x.open("GET", url + "&_=" + seq, true);
        x.onreadystatechange = function () {
            if (x.readyState !== 4 || x !== poll) {
                return;
            }
            poll = null;
            var reply = x.status === 200 ? parse(x.responseText) : null;
            if (!valid(reply)) {
                // network error (status 0), 5xx, a refusal (4xx: 409 one2one, 410 deleted,
                // ...) or a broken reply: ask again later, from the same etags
                backoff();
                return;
            }
            failures = 0;
            deliver(reply);
            if (poll === null && timer === null) {
                listen();
            }
        };
        x.send(null);
    }

    m.sub = function (channel, callback, etag) {
        var key = enc(channel), ch = channels[key], s = { f: callback };
        if (!ch) {
            ch = channels[key] = { name: String(channel), etag: etag ? String(etag) : "0", subs: [] };
        }
        ch.subs.push(s);
        restart(0);
        return {
            cancel: function () {
                var i;
                if (!s.f) {
                    return;
                }
                s.f = null;
                for (i = 0; i < ch.subs.length; i++) {
                    if (ch.subs[i] === s) {
                        ch.subs.splice(i, 1);
                    }
                }
                if (!ch.subs.length && channels[key] === ch) {
                    delete channels[key];
                }
                restart(0);
            }
        };
    };

    m.pub = function (channel, payload, options, callback) {
        var url = m.SERVER + m.PUB + "?channel=" + enc(channel), names = ["key", "size", "life", "one2one"];
        var i, x;
        if (typeof options === "function") {
            callback = options;
            options = null;
        }
        options = options || {};
        for (i = 0; i < names.length; i++) {
            if (options[names[i]] !== undefined && options[names[i]] !== null) {
                url += "&" + names[i] + "=" + enc(options[names[i]]);
            }
        }
        x = new XMLHttpRequest();
        x.open("POST", url, true);
        x.onreadystatechange = function () {
            if (x.readyState !== 4 || !callback) {
                return;
            }
            var reply = parse(x.responseText) || {};
            if (x.status === 200) {
                callback(null, reply.etag);
            } else {
                callback(typeof reply.error === "string" ? reply.error : "HTTP " + x.status);
            }
        };
        x.send(payload === undefined || payload === null ? "" : payload);
    };

    return m;
}());
