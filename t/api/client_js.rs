//! `martd_client_js`: the browser library (js/martd.js) served as `application/javascript`,
//! with `martd.SUB`/`martd.PUB` lines appended for `sub=`/`pub=`; only GET and HEAD.

use super::*;

fn js_conf() -> Conf {
    api_conf(
        "        location = /martd.js { martd_client_js; }
        location = /both.js { martd_client_js sub=/jsub pub=/jpub; }
        location = /pub-only.js { martd_client_js pub=/x/jpub; }
        location = /sub-only.js { martd_client_js sub=/x/jsub; }
",
    )
}

/// The library as the module embeds it.
fn library() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("js/martd.js");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// GET `path`: 200 `application/javascript`, the library, then `extra` lines.
async fn expect_script(c: &mut Conn, path: &str, extra: &[&str]) -> String {
    let r = c.get(path, &[]).await;
    assert_eq!(r.status, 200, "GET {path}: {} {:?}", r.status, r.text());
    assert_eq!(
        media_type(&r).as_deref(),
        Some("application/javascript"),
        "GET {path}: {:?}",
        r.headers
    );
    let body = String::from_utf8(r.body.to_vec()).expect("the script is UTF-8");
    let lib = library();
    let rest = body
        .strip_prefix(lib.as_str())
        .unwrap_or_else(|| panic!("GET {path}: the body does not start with js/martd.js"));
    let lines: Vec<&str> = rest.lines().map(str::trim).filter(|l| !l.is_empty()).collect();
    assert_eq!(lines, extra, "GET {path}: lines after the library: {rest:?}");
    body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn serves_the_library_with_sub_and_pub() {
    let ng = Nginx::start(js_conf());
    let mut c = Conn::open_probed(ng.port).await;
    let plain = expect_script(&mut c, "/martd.js", &[]).await;
    assert_eq!(plain, library(), "without sub=/pub=: exactly js/martd.js");
    for name in ["martd", "sub", "pub", "cancel", "SERVER", "SUB", "PUB", "cid", "XMLHttpRequest"] {
        assert!(plain.contains(name), "the library has no {name:?}");
    }
    expect_script(&mut c, "/both.js", &[r#"martd.SUB = "/jsub";"#, r#"martd.PUB = "/jpub";"#])
        .await;
    expect_script(&mut c, "/pub-only.js", &[r#"martd.PUB = "/x/jpub";"#]).await;
    expect_script(&mut c, "/sub-only.js", &[r#"martd.SUB = "/x/jsub";"#]).await;
    // Arguments do not matter.
    expect_script(&mut c, "/both.js?v=3", &[r#"martd.SUB = "/jsub";"#, r#"martd.PUB = "/jpub";"#])
        .await;

    // HEAD: the headers of GET, no body.
    let get = c.get("/both.js", &[]).await;
    let r = c.send("HEAD", "/both.js", &[], "").await;
    assert_eq!(r.status, 200);
    assert_eq!(media_type(&r).as_deref(), Some("application/javascript"));
    assert!(r.body.is_empty());
    assert_eq!(
        r.header("content-length"),
        Some(get.body.len().to_string().as_str()),
        "HEAD Content-Length"
    );

    // Other methods: 405.
    for m in ["POST", "PUT", "DELETE"] {
        for path in ["/martd.js", "/both.js"] {
            let r = c.send(m, path, &[], "x").await;
            expect_json_error(&r, 405, &format!("{m} {path}"));
        }
    }
    // Still served after that.
    expect_script(&mut c, "/martd.js", &[]).await;
    ng.finish();
}

/// Node.js, if this machine has it.
fn node() -> Option<&'static str> {
    ["/usr/bin/node", "/usr/local/bin/node", "/usr/bin/nodejs"]
        .into_iter()
        .find(|p| std::path::Path::new(p).is_file())
}

/// Whether the tests that run the library in node are skipped: only when asked with
/// `MARTD_TEST_SKIP_NODE=1`. Otherwise node must be there (`./scripts/test` installs it).
fn skip_node() -> bool {
    if std::env::var_os("MARTD_TEST_SKIP_NODE").is_some_and(|v| v == "1") {
        eprintln!("MARTD_TEST_SKIP_NODE=1: the served library is not run in node");
        return true;
    }
    assert!(
        node().is_some(),
        "node is needed to run the served library (apt-get install nodejs; ./scripts/test \
         installs it), or set MARTD_TEST_SKIP_NODE=1"
    );
    false
}

/// Runs `script` with node (bounded); returns its stdout.
async fn run_node(script: &str) -> String {
    let node = node().expect("node");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("t.js");
    std::fs::write(&file, script).unwrap();
    let out = within(
        Duration::from_secs(40),
        "node",
        tokio::task::spawn_blocking(move || {
            std::process::Command::new("timeout")
                .arg("30")
                .arg(node)
                .arg(&file)
                .output()
                .expect("run node")
        }),
    )
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "node failed ({}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A minimal XMLHttpRequest over node's http module, then the served script.
fn node_prelude(script_path: &str, port: u16) -> String {
    format!(
        r#"
const http = require('http'), vm = require('vm'), fs = require('fs');
const BASE = 'http://127.0.0.1:{port}';
function XHR() {{ this.readyState = 0; this.status = 0; this.responseText = ''; this._h = {{}}; }}
XHR.prototype.open = function (m, u) {{ this._m = m; this._u = u; this.readyState = 1; }};
XHR.prototype.setRequestHeader = function (k, v) {{ this._h[k] = v; }};
XHR.prototype.getResponseHeader = function (k) {{ return this._rh ? (this._rh[k.toLowerCase()] || null) : null; }};
XHR.prototype.getAllResponseHeaders = function () {{ return ''; }};
global.polls = 0; global.maxPolls = 0;
XHR.prototype._uncount = function () {{ if (this._counted) {{ this._counted = false; global.polls--; }} }};
XHR.prototype.send = function (body) {{
  const self = this;
  if (this._m === 'GET') {{ this._counted = true; global.polls++; global.maxPolls = Math.max(global.maxPolls, global.polls); }}
  const done = function () {{
    self._uncount();
    self.readyState = 4;
    if (self.onreadystatechange) self.onreadystatechange();
    if (self.status && self.onload) self.onload();
    if (!self.status && self.onerror) self.onerror();
  }};
  const req = http.request(new URL(this._u, BASE), {{ method: this._m, headers: this._h, agent: false }}, function (res) {{
    const chunks = [];
    res.on('data', function (c) {{ chunks.push(c); }});
    res.on('end', function () {{
      if (self._aborted) return;
      self.status = res.statusCode; self._rh = res.headers;
      self.responseText = Buffer.concat(chunks).toString('utf8');
      done();
    }});
  }});
  req.on('error', function () {{ if (self._aborted) return; self.status = 0; done(); }});
  this._req = req;
  if (body !== undefined && body !== null) req.write(body);
  req.end();
}};
XHR.prototype.abort = function () {{ this._aborted = true; this._uncount(); if (this._req) this._req.destroy(); }};
global.XMLHttpRequest = XHR;
global.window = global;
vm.runInThisContext(fs.readFileSync({script_path:?}, 'utf8'));
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn served_library_runs_in_node() {
    if skip_node() {
        return;
    }
    let ng = Nginx::start(js_conf());
    let mut c = Conn::open_probed(ng.port).await;
    let dir = tempfile::tempdir().unwrap();
    let lib_path = dir.path().join("both.js");
    std::fs::write(&lib_path, c.get("/both.js", &[]).await.body).unwrap();
    let lib_path = lib_path.display().to_string();

    // Loading it defines the API with the defaults and the appended lines.
    let out = run_node(&format!(
        "{}\nconsole.log(JSON.stringify({{sub: typeof martd.sub, pub: typeof martd.pub, \
         SERVER: martd.SERVER, SUB: martd.SUB, PUB: martd.PUB, cid: typeof martd.cid}}));",
        node_prelude(&lib_path, ng.port)
    ))
    .await;
    let v = parse_json(out.trim().as_bytes(), "node: the API");
    assert_eq!(
        v,
        serde_json::json!({"sub": "function", "pub": "function", "SERVER": "", "SUB": "/jsub",
                           "PUB": "/jpub", "cid": "string"}),
        "the API after loading /both.js"
    );

    // Subscribed to two channels, it gets what it publishes itself, with the etags `pub`
    // reported; a keyed channel's error reaches the `pub` callback.
    let out = run_node(&format!(
        r#"{}
martd.SERVER = BASE;
const got = [], pubs = [];
function finish(code) {{ console.log(JSON.stringify({{got: got, pubs: pubs, maxPolls: maxPolls}})); process.exit(code); }}
function check() {{ if (got.length >= 2 && pubs.length >= 4) finish(0); }}
martd.sub('n1', function (p, ch, etag) {{ got.push([ch, p, String(etag)]); check(); }});
martd.sub('n 2', function (p, ch, etag) {{ got.push([ch, p, String(etag)]); check(); }});
martd.sub('n3', function (p, ch, etag) {{ got.push([ch, p, String(etag)]); check(); }}).cancel();
setTimeout(function () {{
  martd.pub('n3', 'cancelled', {{}}, function () {{}});
  martd.pub('n1', 'hello', {{}}, function (err, etag) {{
    pubs.push([err, String(etag)]);
    martd.pub('n 2', 'w\u00e9rld', {{size: 5}}, function (err, etag) {{
      pubs.push([err, String(etag)]);
      martd.pub('kk', 'x', {{key: 'sesame'}}, function (err) {{
        pubs.push([err, null]);
        martd.pub('kk', 'y', {{}}, function (err) {{ pubs.push([err, null]); check(); }});
      }});
    }});
  }});
}}, 500);
setTimeout(function () {{ finish(3); }}, 20000);
"#,
        node_prelude(&lib_path, ng.port)
    ))
    .await;
    let v = parse_json(out.trim().as_bytes(), "node: sub and pub");
    assert_eq!(v["maxPolls"], 1, "several subs share one long-poll: {v}");
    let pubs = v["pubs"].as_array().expect("pubs");
    assert_eq!(pubs.len(), 4, "{v}");
    assert!(pubs[0][0].is_null() && pubs[1][0].is_null() && pubs[2][0].is_null(), "{v}");
    assert!(pubs[3][0].is_string(), "the keyed channel's 403 reached the callback: {v}");
    let got = v["got"].as_array().expect("got");
    let mut got: Vec<(String, String, String)> = got
        .iter()
        .map(|g| {
            (
                g[0].as_str().unwrap().into(),
                g[1].as_str().unwrap().into(),
                g[2].as_str().unwrap().into(),
            )
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        [
            ("n 2".to_string(), "wérld".to_string(), pubs[1][1].as_str().unwrap().to_string()),
            ("n1".to_string(), "hello".to_string(), pubs[0][1].as_str().unwrap().to_string()),
        ],
        "{v}"
    );
    // The channel names went through encodeURIComponent on both sides.
    assert_eq!(c.info("n%202").await.map(|i| i.messages), Some(1), "channel n%202");
    ng.finish();
}

/// A node process running a script; its stdout lines come through a channel.
struct NodeProc {
    child: std::process::Child,
    lines: tokio::sync::mpsc::UnboundedReceiver<String>,
    _dir: tempfile::TempDir,
}

impl NodeProc {
    fn start(script: &str) -> NodeProc {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("t.js");
        std::fs::write(&file, script).unwrap();
        let mut child = std::process::Command::new("timeout")
            .arg("60")
            .arg(node().expect("node"))
            .arg(&file)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("run node");
        let out = child.stdout.take().unwrap();
        let (tx, lines) = tokio::sync::mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for l in std::io::BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        NodeProc { child, lines, _dir: dir }
    }

    async fn line(&mut self, what: &str) -> String {
        within(Duration::from_secs(15), what, self.lines.recv())
            .await
            .unwrap_or_else(|| panic!("{what}: node ended"))
    }
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The library keeps its place across a reload (200 `{"channels":{}}`) and across its
/// connection's worker being killed (a network error, then a retry after a backoff): every
/// message arrives once, in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_resumes_across_a_reload_and_a_killed_worker() {
    if skip_node() {
        return;
    }
    let mut ng = Nginx::start(js_conf());
    ng.allow_log("exited on signal 9");
    ng.allow_log("was locked by");
    let mut c = Conn::open_probed(ng.port).await;
    let dir = tempfile::tempdir().unwrap();
    let lib_path = dir.path().join("both.js");
    std::fs::write(&lib_path, c.get("/both.js", &[]).await.body).unwrap();
    let mut node = NodeProc::start(&format!(
        r#"{}
martd.SERVER = BASE;
martd.sub('rc', function (p, ch, etag) {{
  console.log(JSON.stringify([p, ch, String(etag)]));
  if (p === 'END') process.exit(0);
}});
"#,
        node_prelude(&lib_path.display().to_string(), ng.port)
    ));
    let mut got = Vec::new();
    let expect_line = async |node: &mut NodeProc, body: &str, got: &mut Vec<String>| {
        let l = node.line(&format!("node gets {body:?}")).await;
        let v = parse_json(l.as_bytes(), "node line");
        assert_eq!(v[1], "rc", "{l}");
        got.push(v[0].as_str().unwrap().to_string());
    };
    c.wait_listeners("rc", 1).await;
    jpub(&mut c, "rc", "", "m1").await;
    expect_line(&mut node, "m1", &mut got).await;
    c.wait_listeners("rc", 1).await;
    drop(c);
    ng.reload();
    let mut c = Conn::open_probed(ng.port).await;
    jpub(&mut c, "rc", "", "m2").await;
    expect_line(&mut node, "m2", &mut got).await;
    c.wait_listeners("rc", 1).await;
    drop(c);
    for victim in ng.worker_pids() {
        ng.kill_worker(victim, libc::SIGKILL);
        ng.wait_respawn(victim);
    }
    let mut c = Conn::open_probed(ng.port).await;
    for b in ["m3", "m4", "END"] {
        jpub(&mut c, "rc", "", b).await;
    }
    for b in ["m3", "m4", "END"] {
        expect_line(&mut node, b, &mut got).await;
    }
    assert_eq!(got, ["m1", "m2", "m3", "m4", "END"], "every message once, in order");
    drop(node);
    ng.finish();
}

/// A minimal EventSource over node's http module (what the library uses of it): `onopen`
/// once a `200 text/event-stream` head arrives, `onmessage` per event, `onerror` on anything
/// else or the end; counts the streams it opened in `global.streams`.
const NODE_EVENTSOURCE: &str = r#"
global.streams = 0;
function ES(url) {
  const self = this;
  global.streams++;
  this._req = http.get(new URL(url, BASE), { headers: { Accept: 'text/event-stream' }, agent: false }, function (res) {
    if (res.statusCode !== 200 || !/^text\/event-stream/.test(res.headers['content-type'] || '')) {
      res.resume();
      self._fail();
      return;
    }
    if (self.onopen) self.onopen();
    let buf = '';
    res.setEncoding('utf8');
    res.on('data', function (c) {
      buf += c;
      let i;
      while ((i = buf.indexOf('\n\n')) >= 0) {
        const ev = buf.slice(0, i); buf = buf.slice(i + 2);
        const data = ev.split('\n').filter(function (l) { return l.indexOf('data: ') === 0; })
          .map(function (l) { return l.slice(6); }).join('\n');
        if (data && self.onmessage && !self._closed) self.onmessage({ data: data });
      }
    });
    res.on('end', function () { self._fail(); });
  });
  this._req.on('error', function () { self._fail(); });
}
ES.prototype._fail = function () { if (!this._closed && this.onerror) this.onerror(); };
ES.prototype.close = function () { this._closed = true; this._req.destroy(); };
global.EventSource = ES;
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_streams_over_eventsource_and_falls_back_to_long_polls() {
    if skip_node() {
        return;
    }
    let ng = Nginx::start(api_conf(
        "        location = /es.js { martd_client_js sub=/es-sub pub=/jpub; }
        location = /lp.js { martd_client_js sub=/jsub pub=/jpub; }
        location = /es-sub { martd_listen json longpoll eventsource; }
",
    ));
    let mut c = Conn::open_probed(ng.port).await;
    let dir = tempfile::tempdir().unwrap();
    for (script, want) in [("es.js", "eventsource"), ("lp.js", "longpoll")] {
        let lib_path = dir.path().join(script);
        std::fs::write(&lib_path, c.get(&format!("/{script}"), &[]).await.body).unwrap();
        let lib_path = lib_path.display().to_string();
        let prelude = node_prelude(&lib_path, ng.port).replacen(
            "vm.runInThisContext",
            &format!("{NODE_EVENTSOURCE}\nvm.runInThisContext"),
            1,
        );
        let ch = format!("es-{want}");
        let out = run_node(&format!(
            r#"{prelude}
martd.SERVER = BASE;
const got = [];
function finish(code) {{ console.log(JSON.stringify({{got: got, transport: martd.transport, streams: streams, maxPolls: maxPolls}})); process.exit(code); }}
martd.sub('{ch}', function (p, ch, etag) {{ got.push([ch, p]); if (got.length === 3) finish(0); }});
martd.sub('{ch}-2', function (p, ch, etag) {{ got.push([ch, p]); if (got.length === 3) finish(0); }});
setTimeout(function () {{
  martd.pub('{ch}', 'one', {{}}, function () {{
    martd.pub('{ch}-2', 'two', {{}}, function () {{ martd.pub('{ch}', 'three', {{}}, function () {{}}); }});
  }});
}}, 700);
setTimeout(function () {{ finish(3); }}, 20000);
"#
        ))
        .await;
        let v = parse_json(out.trim().as_bytes(), "node: EventSource or long-poll");
        assert_eq!(v["transport"], want, "{v}");
        let mut got: Vec<(String, String)> = v["got"]
            .as_array()
            .expect("got")
            .iter()
            .map(|g| (g[0].as_str().unwrap().into(), g[1].as_str().unwrap().into()))
            .collect();
        if want == "longpoll" {
            // A reply batches what came meanwhile channel by channel: order within a channel.
            got.sort_by_key(|g| g.0.clone());
        }
        let mut expect =
            vec![(ch.clone(), "one"), (format!("{ch}-2"), "two"), (ch.clone(), "three")];
        if want == "longpoll" {
            expect.sort_by_key(|e| e.0.clone());
        }
        let expect: Vec<(String, String)> =
            expect.into_iter().map(|(c, b)| (c, b.to_string())).collect();
        assert_eq!(got, expect, "{v}");
        if want == "eventsource" {
            // One stream for both channels (the second sub restarts it once), no long-poll.
            assert_eq!(v["maxPolls"], 0, "{v}");
            assert!(v["streams"].as_u64().is_some_and(|n| n <= 2), "{v}");
        } else {
            // One stream tried, refused (a JSON reply, not an event stream): long-polls.
            assert_eq!(v["streams"], 1, "{v}");
            assert_eq!(v["maxPolls"], 1, "{v}");
        }
    }
    ng.finish();
}
