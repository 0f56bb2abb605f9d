// A chainwatch webhook receiver: Express, the `standardwebhooks` package, an append-only inbox.
//
// Every webhook is verified on its raw body, written to the inbox (flushed to disk) under its
// event id and answered at once; a worker acts on each stored event exactly once. On start it asks
// chainwatch's API for every event after the last one it holds, so what was sent while it was
// down is not missed.
//
//   npm ci
//   CHAINWATCH_WEBHOOK_SECRET=whsec_... node receiver.js
//
// Environment: CHAINWATCH_WEBHOOK_SECRET (the endpoint's secret), RECEIVER_LISTEN (host:port,
// default 127.0.0.1:8000), RECEIVER_DIR (where inbox.jsonl and actions.log live, default .), and
// for the catch-up on start CHAINWATCH_API (e.g. http://127.0.0.1:8577) with CHAINWATCH_API_TOKEN.

"use strict";

const fs = require("node:fs");
const path = require("node:path");
const express = require("express");
const { Webhook, WebhookVerificationError } = require("standardwebhooks");

const webhook = new Webhook(process.env.CHAINWATCH_WEBHOOK_SECRET);
const dir = process.env.RECEIVER_DIR || ".";
const inboxPath = path.join(dir, "inbox.jsonl");
const actionsPath = path.join(dir, "actions.log");
const [host, port] = (process.env.RECEIVER_LISTEN || "127.0.0.1:8000").split(/:(?=\d+$)/);

// The inbox: one JSON line per event, in arrival order; its ids, and which were acted on.
const known = new Map(); // id -> { event, done }
const queue = [];
let newest = 0;

function load() {
  if (!fs.existsSync(inboxPath)) return;
  const done = new Set(
    fs.existsSync(actionsPath)
      ? fs.readFileSync(actionsPath, "utf8").split("\n").filter(Boolean).map((l) => l.split(" ")[0])
      : [],
  );
  for (const line of fs.readFileSync(inboxPath, "utf8").split("\n")) {
    if (!line) continue;
    let entry;
    try {
      entry = JSON.parse(line);
    } catch {
      continue; // a line cut short by a crash: that event is delivered again
    }
    remember(entry.event, done.has(entry.event.data.id));
  }
}

function remember(event, done) {
  known.set(event.data.id, { event, done });
  newest = Math.max(newest, event.data.sequence || 0);
  if (!done) queue.push(event.data.id);
}

// Keeps an event once, on disk before it is answered; false if its id was already here.
function store(event, source) {
  if (known.has(event.data.id)) return false;
  const fd = fs.openSync(inboxPath, "a");
  try {
    fs.writeSync(fd, JSON.stringify({ source, received_at: Date.now(), event }) + "\n");
    fs.fsyncSync(fd);
  } finally {
    fs.closeSync(fd);
  }
  remember(event, false);
  setImmediate(work);
  return true;
}

// What the shop does with an event: here, one line per event in actions.log.
function act(event) {
  const d = event.data;
  fs.appendFileSync(actionsPath, `${d.id} ${event.type} ${d.txid || ""} ${d.amount_sat ?? ""}\n`);
}

function work() {
  while (queue.length) {
    const entry = known.get(queue.shift());
    if (entry.done) continue;
    act(entry.event);
    entry.done = true;
  }
}

async function reconcile() {
  const api = process.env.CHAINWATCH_API;
  if (!api) return;
  let after = newest;
  for (;;) {
    const resp = await fetch(`${api}/v1/events?after=${after}&limit=1000`, {
      headers: { Authorization: `Bearer ${process.env.CHAINWATCH_API_TOKEN}` },
    });
    if (!resp.ok) throw new Error(`GET /v1/events: HTTP ${resp.status}`);
    const page = await resp.json();
    for (const event of page.events) store(event, "reconcile");
    if (page.events.length === 0) break;
    after = page.next_after;
  }
}

const app = express();

// The raw body: the signature covers these exact bytes, not a re-serialised object.
app.post("/hooks", express.raw({ type: "*/*", limit: "1mb" }), (req, res) => {
  let event;
  try {
    event = webhook.verify(req.body, req.headers); // also refuses a timestamp 5 minutes off
  } catch (e) {
    if (e instanceof WebhookVerificationError) return res.status(401).json({ error: e.message });
    throw e;
  }
  if (!event || !event.data || event.data.id !== req.headers["webhook-id"]) {
    return res.status(400).json({ error: "webhook-id does not name this event" });
  }
  const fresh = store(event, "webhook");
  // At-least-once delivery: a duplicate is answered 200 too, and not acted on again.
  res.status(200).json({ ok: true, duplicate: !fresh });
});

app.get("/health", (_req, res) => res.json({ ok: true }));

load();
work();
reconcile()
  .catch((e) => console.error(`catch-up from the API failed: ${e.message}`))
  .finally(() => app.listen(Number(port), host, () => console.log(`listening on ${host}:${port}`)));
