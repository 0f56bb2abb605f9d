"""A chainwatch webhook receiver: Flask, the `standardwebhooks` package, SQLite as the inbox.

Every webhook is verified on its raw body, stored by its event id and answered at once; a worker
thread acts on each stored event exactly once. On start it asks chainwatch's API for every event
after the last one it holds, so what was sent while it was down is not missed.

    pip install -r requirements.txt
    CHAINWATCH_WEBHOOK_SECRET=whsec_... python receiver.py

Environment: CHAINWATCH_WEBHOOK_SECRET (the endpoint's secret), RECEIVER_LISTEN (host:port,
default 127.0.0.1:8000), RECEIVER_DB (default inbox.sqlite3), and for the catch-up on start
CHAINWATCH_API (e.g. http://127.0.0.1:8577) with CHAINWATCH_API_TOKEN.
"""

import json
import os
import sqlite3
import threading
import time
import urllib.request

from flask import Flask, request
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

SECRET = os.environ["CHAINWATCH_WEBHOOK_SECRET"]
DB = os.environ.get("RECEIVER_DB", "inbox.sqlite3")
LISTEN = os.environ.get("RECEIVER_LISTEN", "127.0.0.1:8000")
API = os.environ.get("CHAINWATCH_API")
TOKEN = os.environ.get("CHAINWATCH_API_TOKEN")

# Refuses a bad signature and a timestamp more than five minutes off (a replayed request).
webhook = Webhook(SECRET)
app = Flask(__name__)
# chainwatch's bodies are a few kilobytes; anything far larger is refused (413) unread.
app.config["MAX_CONTENT_LENGTH"] = 1024 * 1024
local = threading.local()
work = threading.Event()


def db() -> sqlite3.Connection:
    """This thread's connection."""
    if not hasattr(local, "conn"):
        conn = sqlite3.connect(DB, timeout=30, isolation_level=None)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            """CREATE TABLE IF NOT EXISTS inbox (
                 id TEXT PRIMARY KEY, sequence INTEGER, type TEXT NOT NULL, body TEXT NOT NULL,
                 source TEXT NOT NULL, received_at REAL NOT NULL, processed_at REAL)"""
        )
        local.conn = conn
    return local.conn


def store(event: dict, source: str) -> bool:
    """Keeps an event once; False if its id was already here."""
    data = event["data"]
    cur = db().execute(
        "INSERT OR IGNORE INTO inbox (id, sequence, type, body, source, received_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        (data["id"], data.get("sequence"), event["type"], json.dumps(event), source, time.time()),
    )
    work.set()
    return cur.rowcount == 1


@app.post("/hooks")
def hooks():
    body = request.get_data()  # the exact bytes that were signed
    try:
        event = webhook.verify(body, dict(request.headers))
    except WebhookVerificationError as e:
        return {"error": str(e)}, 401
    if event.get("data", {}).get("id") != request.headers.get("webhook-id"):
        return {"error": "webhook-id does not name this event"}, 400
    new = store(event, "webhook")
    # At-least-once delivery: a duplicate is answered 200 too, and not acted on again.
    return {"ok": True, "duplicate": not new}, 200


@app.get("/health")
def health():
    return {"ok": True}


def act(event: dict) -> None:
    """What the shop does with an event: here, one line per event in actions.log."""
    data = event["data"]
    line = f'{data["id"]} {event["type"]} {data.get("txid", "")} {data.get("amount_sat", "")}\n'
    with open(os.path.join(os.path.dirname(os.path.abspath(DB)), "actions.log"), "a") as f:
        f.write(line)


def worker() -> None:
    """Acts on stored events in sequence order, each once."""
    while True:
        work.wait(timeout=1.0)
        work.clear()
        rows = db().execute(
            "SELECT id, body FROM inbox WHERE processed_at IS NULL ORDER BY sequence"
        ).fetchall()
        for event_id, body in rows:
            act(json.loads(body))
            db().execute("UPDATE inbox SET processed_at = ? WHERE id = ?", (time.time(), event_id))


def reconcile() -> None:
    """Fetches every event after the newest one held, page by page."""
    if not API:
        return
    after = db().execute("SELECT COALESCE(MAX(sequence), 0) FROM inbox").fetchone()[0]
    while True:
        req = urllib.request.Request(
            f"{API}/v1/events?after={after}&limit=1000",
            headers={"Authorization": f"Bearer {TOKEN}"},
        )
        with urllib.request.urlopen(req, timeout=30) as resp:
            page = json.load(resp)
        for event in page["events"]:
            store(event, "reconcile")
        if not page["events"]:
            break
        after = page["next_after"]


if __name__ == "__main__":
    reconcile()
    threading.Thread(target=worker, daemon=True).start()
    host, port = LISTEN.rsplit(":", 1)
    app.run(host=host, port=int(port), threaded=True)
