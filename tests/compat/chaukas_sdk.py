"""The published Chaukas SDK (chaukas-sdk 0.1.0), unmodified, against evdb.

Starts `evdb serve --ephemeral`, sends single events and a batch through
`ChaukasClient` (binary protobuf over HTTP, as the SDK does), then checks
through `GET /events` that every event arrived intact. Usage:

    python tests/compat/chaukas_sdk.py target/debug/evdb
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request


def start(evdb, tmp):
    ready = os.path.join(tmp, "ready.json")
    proc = subprocess.Popen(
        [evdb, "serve", "--ephemeral", "--http", "127.0.0.1:0", "--grpc",
         "127.0.0.1:0", "--ready-file", ready],
        stdout=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.time() > deadline:
            raise SystemExit("evdb did not become ready")
        time.sleep(0.02)
    with open(ready) as f:
        return proc, json.load(f)["http"]


def get(url):
    with urllib.request.urlopen(url) as r:
        return json.load(r)


async def send(events_single, events_batch):
    from chaukas.sdk.core.client import ChaukasClient

    # batch_size=1: every event goes alone to POST /events.
    single = ChaukasClient(batch_size=1)
    for e in events_single:
        await single.send_event(e)
    await single.close()
    # One flush of several events: POST /events/batch.
    batch = ChaukasClient(batch_size=1000)
    await batch.send_events(events_batch)
    await batch.close()


def main():
    evdb = sys.argv[1]
    tmp = tempfile.mkdtemp()
    proc, http = start(evdb, tmp)
    try:
        os.environ.update(
            CHAUKAS_ENDPOINT=f"http://{http}",
            CHAUKAS_API_KEY="test-api-key",
            CHAUKAS_TENANT_ID="tenant-a",
            CHAUKAS_PROJECT_ID="project-b",
        )
        from chaukas.sdk.core.event_builder import EventBuilder
        from google.protobuf.json_format import MessageToDict

        b = EventBuilder()
        singles = [
            b.create_session_start(session_id="sess-1", metadata={"user": "ada"}),
            b.create_agent_start(agent_id="ag-1", agent_name="planner", role="plan",
                                 tools=["search", "calc"]),
            b.create_error("boom", error_code="E42", recoverable=True, agent_id="ag-1"),
        ]
        batched = [
            b.create_tool_call_start(tool_name="search", arguments={"q": "evdb"},
                                     agent_id="ag-1", agent_name="planner"),
            b.create_retry(attempt=2, strategy="exponential", backoff_ms=250),
            b.create_session_end(session_id="sess-1"),
        ]
        asyncio.run(send(singles, batched))

        sent = singles + batched
        got = get(f"http://{http}/events?source_system=chaukas&limit=1000&sort_order=asc")
        by_id = {e["event_id"]: e for e in got["events"]}
        failures = []
        for e in sent:
            want = MessageToDict(e, preserving_proto_field_name=True)
            have = by_id.get(e.event_id)
            if have is None:
                failures.append(f"{e.event_id}: missing")
                continue
            if have["data"] != want:
                failures.append(f"{e.event_id}: data differs\n  sent {want}\n  have {have['data']}")
            if have["tags"].count("tenant:tenant-a") != 1:
                failures.append(f"{e.event_id}: tenant tag missing: {have['tags']}")
            one = get(f"http://{http}/events/{e.event_id}")
            if one["data"] != want:
                failures.append(f"{e.event_id}: GET /events/{{id}} differs")
        if got["count"] != len(sent):
            failures.append(f"expected {len(sent)} events, found {got['count']}")
        errors = get(f"http://{http}/events?source_system=chaukas&severity=error")
        if [e["event_type"] for e in errors["events"]] != ["error"]:
            failures.append(f"severity mapping: {errors}")
        if failures:
            print("FAIL chaukas-sdk compatibility:\n" + "\n".join(failures))
            sys.exit(1)
        print(f"ok chaukas-sdk compatibility: {len(sent)} events "
              f"({len(singles)} single, {len(batched)} batched) arrived intact")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        if code != 0:
            print(f"FAIL evdb exited with {code}")
            sys.exit(1)


if __name__ == "__main__":
    main()
