"""The published Chaukas gRPC stubs (chaukas-spec-server and
chaukas-spec-client 1.0.5, grpcio) against evdb, plus the chaukas-sdk HTTP
client: ingest through both, then QueryEvents with several filters and
pages; every returned message must equal the one sent. Usage:

    python tests/compat/chaukas_grpc.py target/debug/evdb
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

import grpc
from google.protobuf import struct_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from chaukas.spec.common.v1 import events_pb2 as ev
from chaukas.spec.common.v1 import query_pb2 as q
from chaukas.spec.server.v1 import server_pb2 as s
from chaukas.spec.server.v1 import server_pb2_grpc as sg
from chaukas.spec.client.v1 import client_pb2 as c
from chaukas.spec.client.v1 import client_pb2_grpc as cg

failures = []


def check(cond, what):
    if not cond:
        failures.append(what)


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
        r = json.load(f)
    return proc, r["http"], r["grpc"]


def event(i, session, kind, severity, status, tenant="acme"):
    e = ev.Event(
        event_id=f"py-{i:03d}",
        tenant_id=tenant,
        project_id="proj",
        session_id=session,
        span_id=f"span-{i}",
        trace_id=f"trace-{session}",
        agent_id="agent-1" if i % 2 else "agent-2",
        agent_name="planner",
        type=kind,
        severity=severity,
        status=status,
        author=ev.AUTHOR_AGENT,
        tags=["gold"] if i % 3 == 0 else [],
    )
    e.timestamp.FromSeconds(1_750_000_000 + i)
    if kind == ev.EVENT_TYPE_TOOL_CALL_START:
        args = struct_pb2.Struct()
        args.update({"query": f"find {i}", "n": i})
        e.tool_call.CopyFrom(ev.ToolCall(id=f"call-{i}", name="search", arguments=args))
    else:
        e.message.CopyFrom(ev.MessageContent(role="agent", text=f"step {i} of {session}"))
    return e


KINDS = [
    (ev.EVENT_TYPE_SESSION_START, ev.SEVERITY_INFO, ev.EVENT_STATUS_STARTED),
    (ev.EVENT_TYPE_TOOL_CALL_START, ev.SEVERITY_DEBUG, ev.EVENT_STATUS_IN_PROGRESS),
    (ev.EVENT_TYPE_ERROR, ev.SEVERITY_ERROR, ev.EVENT_STATUS_FAILED),
    (ev.EVENT_TYPE_SESSION_END, ev.SEVERITY_WARN, ev.EVENT_STATUS_COMPLETED),
]


def query_all(stub, flt, page_size, order):
    out, token, pages = [], "", 0
    while True:
        resp = stub.QueryEvents(s.QueryEventsRequest(query=q.QueryRequest(
            filter=flt, page_size=page_size, page_token=token, order_by_time=order)))
        out.extend(resp.response.events)
        pages += 1
        token = resp.response.next_page_token
        if not token:
            return out, pages


def main():
    evdb = sys.argv[1]
    proc, http, grpc_addr = start(evdb, tempfile.mkdtemp())
    try:
        channel = grpc.insecure_channel(grpc_addr)
        stub = sg.ChaukasServerServiceStub(channel)
        stub.Healthz(s.HealthzRequest())
        caps = stub.GetCapabilities(s.GetCapabilitiesRequest()).capabilities
        check(not caps.worm_retention, "capabilities claim WORM retention")

        sent = {}
        # 1. Unary gRPC ingest (server stub).
        for i in range(8):
            kind, sev, st = KINDS[i % 4]
            e = event(i, f"sess-{i // 4}", kind, sev, st)
            r = stub.IngestEvent(s.IngestEventRequest(event=e))
            check(r.event_id == e.event_id and r.status == "collected", f"ingest answer {r}")
            sent[e.event_id] = e
        dup = stub.IngestEvent(s.IngestEventRequest(event=sent["py-000"]))
        check(dup.status == "duplicate", f"duplicate answer {dup}")
        # 2. Batch gRPC ingest.
        batch = [event(i, f"sess-{i // 4}", *KINDS[i % 4]) for i in range(8, 16)]
        r = stub.IngestEventBatch(s.IngestEventBatchRequest(
            event_batch=ev.EventBatch(batch_id="b-1", events=batch)))
        check(r.accepted_count == 8 and r.rejected_count == 0, f"batch answer {r}")
        for e in batch:
            sent[e.event_id] = e
        # 3. The client-package stub (chaukas.spec.client.v1.ChaukasClientService).
        cstub = cg.ChaukasClientServiceStub(channel)
        e = event(16, "sess-4", *KINDS[0])
        cstub.IngestEvent(c.IngestEventRequest(event=e))
        sent[e.event_id] = e
        # 4. The SDK's HTTP client (binary protobuf over HTTP).
        os.environ.update(CHAUKAS_ENDPOINT=f"http://{http}", CHAUKAS_API_KEY="k",
                          CHAUKAS_TENANT_ID="acme", CHAUKAS_PROJECT_ID="proj")
        from chaukas.sdk.core.client import ChaukasClient
        sdk_events = [event(i, "sess-4", *KINDS[i % 4]) for i in range(17, 20)]

        async def via_sdk():
            client = ChaukasClient(batch_size=100)
            await client.send_events(sdk_events)
            await client.close()
        asyncio.run(via_sdk())
        for e in sdk_events:
            sent[e.event_id] = e
        # Another tenant, to be filtered out.
        other = event(99, "sess-x", *KINDS[0], tenant="other")
        stub.IngestEvent(s.IngestEventRequest(event=other))

        def expect(flt, pred, page_size=3, order=q.SORT_ORDER_ASC, what=""):
            got, pages = query_all(stub, flt, page_size, order)
            want = sorted((e for e in sent.values() if pred(e)),
                          key=lambda e: e.timestamp.seconds,
                          reverse=order == q.SORT_ORDER_DESC)
            check([g.event_id for g in got] == [w.event_id for w in want],
                  f"{what}: got {[g.event_id for g in got]}, want {[w.event_id for w in want]}")
            for g in got:
                if g.event_id in sent:
                    check(g == sent[g.event_id], f"{what}: {g.event_id} differs from what was sent")
                    # deterministic=True orders map entries (Struct fields): the
                    # Python runtime iterates a map in an order of its own, which
                    # can differ between a message and its copy in a batch.
                    check(g.SerializeToString(deterministic=True)
                          == sent[g.event_id].SerializeToString(deterministic=True),
                          f"{what}: {g.event_id} bytes differ")
            return pages

        pages = expect(q.QueryFilter(tenant_id="acme"), lambda e: True, what="tenant")
        check(pages >= 7, f"expected paging, got {pages} pages")
        expect(q.QueryFilter(tenant_id="acme"), lambda e: True, page_size=4,
               order=q.SORT_ORDER_DESC, what="tenant desc")
        expect(q.QueryFilter(session_id="sess-1"), lambda e: e.session_id == "sess-1", what="session")
        expect(q.QueryFilter(tenant_id="acme", types=[ev.EVENT_TYPE_ERROR, ev.EVENT_TYPE_SESSION_END]),
               lambda e: e.type in (ev.EVENT_TYPE_ERROR, ev.EVENT_TYPE_SESSION_END), what="types")
        expect(q.QueryFilter(tenant_id="acme", severities=[ev.SEVERITY_ERROR, ev.SEVERITY_DEBUG]),
               lambda e: e.severity in (ev.SEVERITY_ERROR, ev.SEVERITY_DEBUG), what="severities")
        expect(q.QueryFilter(tenant_id="acme", statuses=[ev.EVENT_STATUS_COMPLETED]),
               lambda e: e.status == ev.EVENT_STATUS_COMPLETED, what="statuses")
        expect(q.QueryFilter(tenant_id="acme", tags=["gold"]), lambda e: "gold" in e.tags, what="tags")
        expect(q.QueryFilter(agent_id="agent-1", project_id="proj", tenant_id="acme"),
               lambda e: e.agent_id == "agent-1", what="agent")
        expect(q.QueryFilter(span_id="span-5"), lambda e: e.span_id == "span-5", what="span")
        expect(q.QueryFilter(trace_id="trace-sess-2"), lambda e: e.trace_id == "trace-sess-2", what="trace")
        expect(q.QueryFilter(tenant_id="acme", text_query="find 5"),
               lambda e: e.event_id == "py-005", what="text")
        t0, t1 = Timestamp(), Timestamp()
        t0.FromSeconds(1_750_000_003)
        t1.FromSeconds(1_750_000_006)
        expect(q.QueryFilter(tenant_id="acme", time=q.TimeRange(start=t0, end=t1)),
               lambda e: 3 <= e.timestamp.seconds - 1_750_000_000 <= 6, what="time")

        st = stub.GetEventStats(s.GetEventStatsRequest(tenant_id="acme", project_id="proj"))
        check(st.total_events == len(sent), f"stats total {st.total_events} != {len(sent)}")
        check(st.events_by_type["EVENT_TYPE_SESSION_START"] == 5, f"stats by type {st}")
        check(st.total_sessions == 5, f"sessions {st.total_sessions}")
        check(abs(st.avg_session_duration_ms - 3000.0) < 1e-6, f"avg {st.avg_session_duration_ms}")

        try:
            stub.QueryEvents(s.QueryEventsRequest(query=q.QueryRequest(page_token="bogus")))
            check(False, "a bogus page token was accepted")
        except grpc.RpcError as err:
            check(err.code() == grpc.StatusCode.INVALID_ARGUMENT, f"bogus token: {err.code()}")

        if failures:
            print("FAIL Chaukas gRPC compatibility:\n" + "\n".join(failures))
            sys.exit(1)
        print(f"ok Chaukas gRPC compatibility: {len(sent)} events through the server stub, the "
              "client stub and chaukas-sdk came back equal under 12 filters")
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
        if code != 0:
            print(f"FAIL evdb exited with {code}")
            sys.exit(1)


if __name__ == "__main__":
    main()
