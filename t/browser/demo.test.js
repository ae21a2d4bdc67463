// The demo page of nginx-conf/martd.conf in a real (headless) Chromium, driven by playwright-core.
// Run by scripts/browser-test, which starts nginx and sets:
//   MARTD_URL       http://127.0.0.1:PORT (the demo server)
//   MARTD_PID_FILE  its master's pid file (for the reload)
// NODE_PATH must reach playwright-core and acorn. Exits non-zero on the first failure.
"use strict";

const fs = require("fs");
const http = require("http");
const acorn = require("acorn");
const { chromium } = require("playwright-core");

const BASE = process.env.MARTD_URL;
const PID_FILE = process.env.MARTD_PID_FILE;
const DEADLINE_MS = 100000; // scripts/browser-test kills us at 120 s; fail clearly before that

let browser = null;
let step = "start";

function fail(msg) {
    throw new Error(msg);
}

function sleep(ms) {
    return new Promise((ok) => setTimeout(ok, ms));
}

// Polls f() until it returns something truthy, at most `ms`; fails with `what` otherwise.
async function until(what, ms, f) {
    const end = Date.now() + ms;
    let last;
    for (;;) {
        last = await f();
        if (last) return last;
        if (Date.now() > end) fail(`timed out after ${ms} ms waiting for ${what}`);
        await sleep(50);
    }
}

// One HTTP request on a connection of its own (no keep-alive across reloads).
function request(method, path, body) {
    return new Promise((ok, ko) => {
        const req = http.request(BASE + path, { method, agent: false, timeout: 10000 }, (res) => {
            const chunks = [];
            res.on("data", (c) => chunks.push(c));
            res.on("end", () =>
                ok({ status: res.statusCode, headers: res.headers, body: Buffer.concat(chunks) }));
        });
        req.on("timeout", () => req.destroy(new Error(`${method} ${path}: no answer in 10 s`)));
        req.on("error", ko);
        req.end(body);
    });
}

async function publish(channel, body) {
    const r = await request("POST", "/martd/pub?channel=" + encodeURIComponent(channel), body);
    const text = r.body.toString();
    if (r.status !== 200) fail(`publish to ${channel}: HTTP ${r.status} ${text}`);
    const reply = JSON.parse(text);
    if (!/^[0-9]+$/.test(reply.etag) || typeof reply.listeners !== "number") {
        fail(`publish to ${channel}: unexpected reply ${text}`);
    }
    return reply;
}

async function listeners(channel) {
    const r = await request("GET", "/martd/pub?channel=" + encodeURIComponent(channel));
    return r.status === 200 ? JSON.parse(r.body.toString()).listeners : 0;
}

function workerPids(master) {
    const pids = [];
    for (const name of fs.readdirSync("/proc")) {
        if (!/^[0-9]+$/.test(name)) continue;
        let stat;
        try {
            stat = fs.readFileSync(`/proc/${name}/stat`, "utf8");
        } catch (e) {
            continue; // gone meanwhile
        }
        // "pid (comm) state ppid ...": comm may hold spaces, so split after the last ')'
        const ppid = +stat.slice(stat.lastIndexOf(")") + 2).split(" ")[1];
        if (ppid === master) pids.push(+name);
    }
    return pids.sort();
}

function alive(pid) {
    try {
        process.kill(pid, 0);
        return true;
    } catch (e) {
        return false;
    }
}

// SIGHUP to the master; waits until every old worker has exited and new ones run.
async function reload() {
    const master = +fs.readFileSync(PID_FILE, "utf8").trim();
    const old = workerPids(master);
    if (!old.length) fail(`nginx master ${master} has no workers`);
    process.kill(master, "SIGHUP");
    await until(`the old workers (${old.join(", ")}) to exit after SIGHUP`, 30000, () => {
        const now = workerPids(master);
        return now.length > 0 && !old.some(alive) && !now.some((p) => old.includes(p));
    });
    return { old, now: workerPids(master) };
}

// The messages shown in the page's list, in order.
function shown(page) {
    return page.$$eval("#log li", (lis) => lis.map((li) => li.textContent));
}

async function showsOnce(page, msg) {
    await until(`the page to show "${msg}"`, 15000, async () => (await shown(page)).includes(msg));
}

async function main() {
    if (!BASE || !PID_FILE) fail("MARTD_URL and MARTD_PID_FILE must be set");
    const unique = `${Date.now()}-${process.pid}`;

    step = "client.js";
    const js = await request("GET", "/client.js");
    if (js.status !== 200) fail(`GET /client.js: HTTP ${js.status}`);
    if (!/^application\/javascript/.test(js.headers["content-type"] || "")) {
        fail(`GET /client.js: Content-Type ${js.headers["content-type"]}`);
    }
    const src = js.body.toString();
    if (!/\nmartd\.SUB = "\/martd\/sub";\nmartd\.PUB = "\/martd\/pub";\n?$/.test(src)) {
        fail(`/client.js does not end with the SUB and PUB lines: ...${JSON.stringify(src.slice(-80))}`);
    }
    try {
        acorn.parse(src, { ecmaVersion: 5 });
    } catch (e) {
        fail(`/client.js is not ES5: ${e.message}`);
    }

    step = "launch chromium";
    browser = await chromium.launch({
        executablePath: "/usr/bin/chromium",
        timeout: 30000,
        args: ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"],
    });
    const page = await browser.newPage();
    const pageErrors = [];
    page.on("pageerror", (e) => pageErrors.push(e.message));

    step = "open the demo page";
    await page.goto(BASE + "/", { timeout: 15000 });
    if (!/martd/.test(await page.title())) fail(`demo page title: ${await page.title()}`);
    await until('the page to say "listening on demo"', 10000, async () =>
        (await page.textContent("#state")) === "listening on demo");
    await until("the page's long-poll to wait on channel demo", 10000, async () =>
        (await listeners("demo")) === 1);

    step = "the page listens over EventSource";
    const transport = await page.evaluate(() => martd.transport);
    if (transport !== "eventsource") fail(`the page listens by ${transport}, expected eventsource`);

    step = "publish before the reload";
    const first = `first ${unique}`;
    const r1 = await publish("demo", first);
    if (r1.listeners !== 1) fail(`publish: ${r1.listeners} listeners waiting, expected 1`);
    await showsOnce(page, first);

    step = "reload nginx";
    const t0 = Date.now();
    const w = await reload();
    console.log(`reloaded in ${Date.now() - t0} ms: workers ${w.old.join(",")} -> ${w.now.join(",")}`);

    step = "publish after the reload";
    const second = `second ${unique}`;
    await publish("demo", second);
    await showsOnce(page, second);
    await until("the page's long-poll to wait again", 10000, async () => (await listeners("demo")) === 1);

    step = "publish from the page";
    await page.fill("#msg", `third ${unique}`);
    await page.click("#publish button");
    await until('the page to say "published"', 10000, async () =>
        (await page.textContent("#published")) === "published");
    await showsOnce(page, `third ${unique}`);

    step = "every message exactly once";
    await sleep(500); // a duplicate would have arrived by now
    const got = await shown(page);
    const want = [first, second, `third ${unique}`];
    if (JSON.stringify(got) !== JSON.stringify(want)) {
        fail(`the page shows ${JSON.stringify(got)}, expected each message once: ${JSON.stringify(want)}`);
    }

    step = "several channels on one long-poll, a binary message";
    const bin = Buffer.from([0xff, 0x00, 0x80, 0x41]);
    const other = `other channel/${unique}`;
    await page.evaluate((ch) => {
        window.other = [];
        martd.sub(ch, function (payload, channel) {
            window.other.push([channel, payload.split("").map((c) => c.charCodeAt(0))]);
        });
    }, other);
    await until("one long-poll waiting on both channels", 10000, async () =>
        (await listeners(other)) === 1 && (await listeners("demo")) === 1);
    await publish(other, bin);
    const o = await until("the binary message", 10000, () => page.evaluate(() => window.other[0]));
    if (o[0] !== other || JSON.stringify(o[1]) !== JSON.stringify([...bin])) {
        fail(`binary message arrived as ${JSON.stringify(o)}, expected [${JSON.stringify(other)}, ${JSON.stringify([...bin])}]`);
    }

    if (pageErrors.length) fail(`errors in the page: ${pageErrors.join("; ")}`);
    await browser.close();
    browser = null;
}

const timer = setTimeout(() => {
    console.error(`FAIL (${step}): the test did not finish in ${DEADLINE_MS / 1000} s`);
    process.exit(1);
}, DEADLINE_MS);

// scripts/browser-test stops us with SIGTERM on its own exit (playwright-core kills the browser
// it launched when the process exits)
process.on("SIGTERM", () => {
    console.error(`FAIL (${step}): terminated`);
    process.exit(1);
});

main().then(
    () => {
        clearTimeout(timer);
        console.log("browser test: 1 passed, 0 failed");
    },
    async (e) => {
        console.error(`FAIL (${step}): ${e && e.message ? e.message : e}`);
        if (browser) await browser.close().catch(() => {});
        process.exit(1);
    },
);
