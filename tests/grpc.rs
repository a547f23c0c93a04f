//! The gRPC surface (contract §4, §5) against the real daemon: the Chaukas
//! service (every RPC, every filter, paging, byte-identical events), the
//! `evdb.v1` service (unary and streaming ingest, get, query, stats,
//! delete, tail), error codes, health and reflection.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

mod common;

use std::time::Duration;

use common::Daemon;
use evdb::api::proto::chaukas::common::v1 as pb;
use evdb::api::proto::chaukas::server::v1 as server;
use evdb::api::proto::chaukas::server::v1::chaukas_server_service_client::ChaukasServerServiceClient;
use evdb::api::proto::chaukas::wire;
use evdb::api::proto::evdb::v1 as ev;
use evdb::api::proto::evdb::v1::evdb_client::EvdbClient;
use prost::Message;
use tonic::Code;
use tonic::transport::Channel;

async fn channel(d: &Daemon) -> Channel {
    Channel::from_shared(format!("http://{}", d.grpc))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

fn ts(seconds: i64) -> Option<prost_types::Timestamp> {
    Some(prost_types::Timestamp { seconds, nanos: 0 })
}

/// 24 events: 3 tenants × 2 sessions × 4 kinds, one second apart.
fn chaukas_events() -> Vec<pb::Event> {
    let kinds = [
        (
            pb::EventType::SessionStart,
            pb::EventStatus::Started,
            pb::Severity::Info,
        ),
        (
            pb::EventType::ToolCallStart,
            pb::EventStatus::InProgress,
            pb::Severity::Debug,
        ),
        (
            pb::EventType::Error,
            pb::EventStatus::Failed,
            pb::Severity::Error,
        ),
        (
            pb::EventType::SessionEnd,
            pb::EventStatus::Completed,
            pb::Severity::Warn,
        ),
    ];
    let mut out = Vec::new();
    for i in 0..24usize {
        let (kind, st, sev) = kinds[i % 4];
        let session = i / 4;
        out.push(pb::Event {
            event_id: format!("c{i:02}"),
            tenant_id: format!("t{}", session % 3),
            project_id: "p".into(),
            session_id: format!("s{session}"),
            agent_id: format!("a{}", i % 2),
            span_id: format!("sp{i}"),
            trace_id: format!("tr{session}"),
            r#type: kind as i32,
            status: st as i32,
            severity: sev as i32,
            timestamp: ts(1_700_000_000 + i as i64),
            tags: if i % 3 == 0 {
                vec!["gold".into()]
            } else {
                vec![]
            },
            content: Some(pb::event::Content::Message(pb::MessageContent {
                role: "user".into(),
                text: format!("message number {i}"),
                metadata: None,
            })),
            ..pb::Event::default()
        });
    }
    out
}

fn ids(events: &[pb::Event]) -> Vec<String> {
    events.iter().map(|e| e.event_id.clone()).collect()
}

async fn query(
    c: &mut ChaukasServerServiceClient<Channel>,
    filter: pb::QueryFilter,
    page_size: i32,
    token: &str,
    order: pb::SortOrder,
) -> Result<pb::QueryResponse, tonic::Status> {
    let r = c
        .query_events(server::QueryEventsRequest {
            query: Some(pb::QueryRequest {
                filter: Some(filter),
                page_size,
                page_token: token.into(),
                order_by_time: order as i32,
            }),
        })
        .await?;
    Ok(r.into_inner().response.unwrap())
}

#[tokio::test]
async fn chaukas_service_every_rpc() {
    let d = Daemon::start();
    let mut c = ChaukasServerServiceClient::new(channel(&d).await);
    c.healthz(server::HealthzRequest {}).await.unwrap();
    let caps = c
        .get_capabilities(server::GetCapabilitiesRequest {})
        .await
        .unwrap()
        .into_inner()
        .capabilities
        .unwrap();
    assert!(!caps.worm_retention && !caps.audit_proofs && caps.data_access_events);

    let events = chaukas_events();
    let r = c
        .ingest_event(server::IngestEventRequest {
            event: Some(events[0].clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (r.event_id.as_str(), r.status.as_str()),
        ("c00", "collected")
    );
    let r = c
        .ingest_event(server::IngestEventRequest {
            event: Some(events[0].clone()),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.status, "duplicate");
    let mut bad = events[1].clone();
    bad.event_id = "bad".into();
    bad.tags = (0..70).map(|i| format!("x{i}")).collect();
    let batch = server::IngestEventBatchRequest {
        event_batch: Some(pb::EventBatch {
            batch_id: "b1".into(),
            events: events[1..].iter().cloned().chain([bad.clone()]).collect(),
            ..pb::EventBatch::default()
        }),
    };
    let r = c.ingest_event_batch(batch).await.unwrap().into_inner();
    assert_eq!(r.batch_id, "b1");
    assert_eq!(r.accepted_count, 23);
    assert_eq!(r.rejected_count, 1);
    assert_eq!(r.rejected_event_ids, ["bad"]);
    let err = c
        .ingest_event(server::IngestEventRequest { event: Some(bad) })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("tags"), "{}", err.message());

    // Every filter field, against the fixture.
    let want = |f: &dyn Fn(usize, &pb::Event) -> bool| -> Vec<String> {
        events
            .iter()
            .enumerate()
            .filter(|(i, e)| f(*i, e))
            .map(|(_, e)| e.event_id.clone())
            .collect()
    };
    let cases: Vec<(pb::QueryFilter, Vec<String>)> = vec![
        (
            pb::QueryFilter {
                tenant_id: "t1".into(),
                ..Default::default()
            },
            want(&|_, e| e.tenant_id == "t1"),
        ),
        (
            pb::QueryFilter {
                project_id: "p".into(),
                session_id: "s2".into(),
                ..Default::default()
            },
            want(&|_, e| e.session_id == "s2"),
        ),
        (
            pb::QueryFilter {
                agent_id: "a1".into(),
                trace_id: "tr0".into(),
                ..Default::default()
            },
            want(&|_, e| e.agent_id == "a1" && e.trace_id == "tr0"),
        ),
        (
            pb::QueryFilter {
                span_id: "sp7".into(),
                ..Default::default()
            },
            vec!["c07".into()],
        ),
        (
            pb::QueryFilter {
                types: vec![
                    pb::EventType::Error as i32,
                    pb::EventType::SessionEnd as i32,
                ],
                ..Default::default()
            },
            want(&|i, _| i % 4 >= 2),
        ),
        (
            pb::QueryFilter {
                statuses: vec![
                    pb::EventStatus::Started as i32,
                    pb::EventStatus::Completed as i32,
                ],
                ..Default::default()
            },
            want(&|i, _| i % 4 == 0 || i % 4 == 3),
        ),
        (
            pb::QueryFilter {
                severities: vec![pb::Severity::Debug as i32, pb::Severity::Error as i32],
                ..Default::default()
            },
            want(&|i, _| i % 4 == 1 || i % 4 == 2),
        ),
        (
            pb::QueryFilter {
                tags: vec!["gold".into()],
                ..Default::default()
            },
            want(&|i, _| i % 3 == 0),
        ),
        (
            pb::QueryFilter {
                text_query: "number 13".into(),
                ..Default::default()
            },
            vec!["c13".into()],
        ),
        (
            pb::QueryFilter {
                time: Some(pb::TimeRange {
                    start: ts(1_700_000_005),
                    end: ts(1_700_000_008),
                }),
                ..Default::default()
            },
            want(&|i, _| (5..=8).contains(&i)),
        ),
    ];
    for (filter, expected) in cases {
        let r = query(&mut c, filter.clone(), 100, "", pb::SortOrder::Asc)
            .await
            .unwrap();
        assert_eq!(ids(&r.events), expected, "{filter:?}");
    }
    // Paging, newest first by default; events equal what was sent.
    let mut got = Vec::new();
    let mut token = String::new();
    loop {
        let r = query(
            &mut c,
            pb::QueryFilter::default(),
            5,
            &token,
            pb::SortOrder::Unspecified,
        )
        .await
        .unwrap();
        got.extend(r.events);
        if r.next_page_token.is_empty() {
            break;
        }
        token = r.next_page_token;
    }
    let mut expected = events.clone();
    expected.reverse();
    assert_eq!(got, expected);
    let err = query(
        &mut c,
        pb::QueryFilter::default(),
        5,
        "nonsense",
        pb::SortOrder::Asc,
    )
    .await
    .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "page_token: not a cursor returned by this server"
    );

    // Stats for a tenant: sessions start at i and end 3 s later.
    let s = c
        .get_event_stats(server::GetEventStatsRequest {
            tenant_id: "t0".into(),
            project_id: "p".into(),
            time_range: None,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.total_events, 8);
    assert_eq!(s.total_sessions, 2);
    assert_eq!(s.events_by_type["EVENT_TYPE_SESSION_START"], 2);
    assert!((s.avg_session_duration_ms - 3000.0).abs() < 1e-6, "{s:?}");
}

#[tokio::test]
async fn chaukas_events_come_back_byte_for_byte() {
    let d = Daemon::start();
    // An encoding prost would not produce: the oneof content before field
    // 7, and an unknown field 200. Sent over HTTP as raw bytes.
    let base = pb::Event {
        event_id: "raw-1".into(),
        tenant_id: "t".into(),
        ..pb::Event::default()
    };
    let content = pb::Event {
        content: Some(pb::event::Content::Message(pb::MessageContent {
            role: "r".into(),
            text: "x".into(),
            metadata: None,
        })),
        ..pb::Event::default()
    };
    let typed = pb::Event {
        r#type: pb::EventType::System as i32,
        ..pb::Event::default()
    };
    let mut bytes = base.encode_to_vec();
    bytes.extend(content.encode_to_vec());
    bytes.extend(typed.encode_to_vec());
    bytes.extend([0xc2, 0x0c, 0x02, b'h', b'i']); // field 200, bytes "hi"
    let mut request = vec![0x0a];
    prost::encoding::encode_varint(bytes.len() as u64, &mut request);
    request.extend(&bytes);
    let r = reqwest::Client::new()
        .post(d.url("/events"))
        .header("content-type", "application/x-protobuf")
        .body(request)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    // A raw client sees the exact bytes.
    let mut raw =
        wire::chaukas_server_service_client::ChaukasServerServiceClient::new(channel(&d).await);
    let r = raw
        .query_events(wire::QueryEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response.unwrap().events, vec![bytes.clone()]);
    // And gRPC ingest keeps bytes too.
    let mut other = bytes.clone();
    other[2..7].copy_from_slice(b"raw-2");
    raw.ingest_event(wire::IngestEventRequest {
        event: other.clone(),
    })
    .await
    .unwrap();
    let r = raw
        .query_events(wire::QueryEventsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.response.unwrap().events, vec![other, bytes]);
}

#[tokio::test]
async fn evdb_service_every_rpc() {
    let d = Daemon::start();
    let mut c = EvdbClient::new(channel(&d).await);
    let event = |i: usize, source: &str, sev: ev::Severity| ev::Event {
        event_id: format!("g{i}"),
        timestamp: ts(1_738_756_800 + i as i64),
        source_system: source.into(),
        event_type: "t".into(),
        severity: sev as i32,
        correlation_id: Some(format!("c{}", i % 2)),
        tags: vec!["x".into()],
        data_json: format!(r#"{{"n":{i}}}"#),
    };
    // Tail first: it sees what is stored after it.
    let mut tail = c
        .tail(ev::TailRequest {
            source_systems: vec!["a".into()],
            min_severity: ev::Severity::Warning as i32,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let r = c
        .ingest(ev::IngestRequest {
            events: vec![
                event(0, "a", ev::Severity::Error),
                event(1, "b", ev::Severity::Info),
                ev::Event {
                    source_system: "a".into(),
                    ..Default::default()
                },
                event(0, "a", ev::Severity::Error),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.collected, r.failed, r.duplicates), (2, 1, 1));
    assert_eq!(r.errors[0].index, 2);
    assert_eq!(r.errors[0].field, "event_type");
    assert_eq!(r.event_ids, ["g0", "g1", "", "g0"]);
    // Client streaming: three messages, indexes count across the stream.
    let stream = futures_util::stream::iter(vec![
        ev::IngestRequest {
            events: vec![event(2, "a", ev::Severity::Critical)],
        },
        ev::IngestRequest {
            events: vec![
                event(3, "a", ev::Severity::Info),
                event(4, "b", ev::Severity::Warning),
            ],
        },
        ev::IngestRequest {
            events: vec![ev::Event {
                event_type: "t".into(),
                source_system: "a".into(),
                data_json: "[1]".into(),
                ..Default::default()
            }],
        },
    ]);
    let r = c.ingest_stream(stream).await.unwrap().into_inner();
    assert_eq!((r.collected, r.failed), (3, 1));
    assert_eq!(r.errors[0].index, 3);
    assert_eq!(r.errors[0].field, "data_json");
    let mut tailed = Vec::new();
    while tailed.len() < 2 {
        let e = tokio::time::timeout(Duration::from_secs(10), tail.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        tailed.push(e.event_id);
    }
    assert_eq!(tailed, ["g0", "g2"]);

    let e = c
        .get(ev::GetRequest {
            event_id: "g1".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(e, event(1, "b", ev::Severity::Info));
    let err = c
        .get(ev::GetRequest {
            event_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Query with filters and a cursor.
    let only_a = ev::Filter {
        source_systems: vec!["a".into()],
        ..Default::default()
    };
    assert_eq!(every_id(&mut c, Some(only_a), 1).await, ["g0", "g2", "g3"]);
    // Each filter of `Filter` (events g0, g1 (deleted later), g2, g3, g4).
    let cases: Vec<(ev::Filter, Vec<&str>)> = vec![
        (
            ev::Filter {
                event_types: vec!["t".into()],
                severity: ev::Severity::Info as i32,
                ..Default::default()
            },
            vec!["g3", "g1"],
        ),
        (
            ev::Filter {
                correlation_id: "c0".into(),
                ..Default::default()
            },
            vec!["g4", "g2", "g0"],
        ),
        (
            ev::Filter {
                tags: vec!["x".into()],
                start_time: ts(1_738_756_801),
                end_time: ts(1_738_756_802),
                ..Default::default()
            },
            vec!["g2", "g1"],
        ),
        (
            ev::Filter {
                text: r#""n":3"#.into(),
                ..Default::default()
            },
            vec!["g3"],
        ),
        (
            ev::Filter {
                source_systems: vec!["b".into()],
                min_severity: ev::Severity::Warning as i32,
                ..Default::default()
            },
            vec!["g4"],
        ),
    ];
    for (filter, want) in cases {
        let r = c
            .query(ev::QueryRequest {
                filter: Some(filter.clone()),
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        let got: Vec<String> = r.events.into_iter().map(|e| e.event_id).collect();
        assert_eq!(got, want, "{filter:?}");
    }
    let err = c
        .query(ev::QueryRequest {
            limit: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("limit"));
    let err = c
        .query(ev::QueryRequest {
            cursor: "abc".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(
        err.message(),
        "cursor: not a cursor returned by this server"
    );

    let s = c
        .stats(ev::StatsRequest {
            filter: Some(ev::Filter {
                min_severity: ev::Severity::Warning as i32,
                ..Default::default()
            }),
            distinct_correlation_ids: true,
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(s.total_events, 3);
    assert_eq!(s.by_source_system["a"], 2);
    assert_eq!(s.distinct_correlation_ids, Some(1));

    let r = c
        .delete(ev::DeleteRequest {
            target: Some(ev::delete_request::Target::EventId("g1".into())),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted, 1);
    let err = c
        .delete(ev::DeleteRequest {
            target: Some(ev::delete_request::Target::EventId("g1".into())),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let r = c
        .delete(ev::DeleteRequest {
            target: Some(ev::delete_request::Target::Before(
                ts(1_738_756_803).unwrap(),
            )),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted, 2);
    let err = c
        .delete(ev::DeleteRequest { target: None })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    // By filter: an empty one would empty the store, and is refused.
    let err = c
        .delete(ev::DeleteRequest {
            target: Some(ev::delete_request::Target::Filter(ev::Filter::default())),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().starts_with("filter: "), "{}", err.message());
    let r = c
        .delete(ev::DeleteRequest {
            target: Some(ev::delete_request::Target::Filter(ev::Filter {
                source_systems: vec!["b".into()],
                ..Default::default()
            })),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.deleted, 1);
    let err = c
        .get(ev::GetRequest {
            event_id: "g4".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    c.get(ev::GetRequest {
        event_id: "g3".into(),
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn health_reflection_and_shutdown_of_tails() {
    let mut d = Daemon::start();
    let ch = channel(&d).await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    for service in [
        "",
        "evdb.v1.Evdb",
        "chaukas.spec.server.v1.ChaukasServerService",
    ] {
        let r = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(
            r.status,
            tonic_health::pb::health_check_response::ServingStatus::Serving as i32
        );
    }
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut refl = ServerReflectionClient::new(ch.clone());
    let req = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut resp = refl
        .server_reflection_info(futures_util::stream::iter(vec![req]))
        .await
        .unwrap()
        .into_inner();
    let msg = resp.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = msg.message_response else {
        panic!("{msg:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "evdb.v1.Evdb",
        "chaukas.spec.server.v1.ChaukasServerService",
    ] {
        assert!(names.iter().any(|n| n == want), "{names:?}");
    }
    // An open tail ends with UNAVAILABLE on shutdown, and the daemon exits 0.
    let mut c = EvdbClient::new(ch);
    let mut tail = c
        .tail(ev::TailRequest::default())
        .await
        .unwrap()
        .into_inner();
    let stopper = tokio::task::spawn_blocking(move || d.stop());
    let end = tokio::time::timeout(Duration::from_secs(20), tail.message())
        .await
        .unwrap();
    match end {
        Err(status) => assert_eq!(status.code(), Code::Unavailable),
        Ok(None) => {}
        Ok(Some(e)) => panic!("unexpected event {e:?}"),
    }
    let (ok, _, err) = stopper.await.unwrap();
    assert!(ok, "{err}");
}

/// A long `IngestStream` (messages read while earlier ones are made
/// durable): events are stored in stream order, a duplicate of an earlier
/// message is told as such, and rejections come back in event order.
#[tokio::test]
async fn a_long_ingest_stream_keeps_its_order_and_its_tally() {
    let d = Daemon::start();
    let mut c = EvdbClient::new(channel(&d).await);
    let event = |id: String| ev::Event {
        event_id: id,
        // One timestamp for all: arrival order decides the query order.
        timestamp: ts(1_738_756_800),
        source_system: "s".into(),
        event_type: "t".into(),
        severity: ev::Severity::Info as i32,
        ..Default::default()
    };
    let mut messages = Vec::new();
    let mut want = Vec::new();
    for m in 0..20 {
        let mut events = Vec::new();
        for i in 0..50 {
            let id = format!("m{m:02}-{i:02}");
            want.push(id.clone());
            events.push(event(id));
        }
        // Every fifth message repeats an event of the previous one and
        // carries one the store rejects (no event_type).
        if m % 5 == 4 {
            events.push(event(format!("m{:02}-00", m - 1)));
            events.push(ev::Event {
                event_type: String::new(),
                ..event(format!("bad{m}"))
            });
        }
        messages.push(ev::IngestRequest { events });
    }
    let r = c
        .ingest_stream(futures_util::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.collected, r.duplicates, r.failed), (1000, 4, 4));
    let indexes: Vec<u32> = r.errors.iter().map(|e| e.index).collect();
    // Message m starts at event 50 m + 2 (m / 5); its bad event is its last.
    assert_eq!(indexes, [251, 503, 755, 1007]);
    assert_eq!(every_id(&mut c, None, 300).await, want);
}

/// Messages larger than the listener's stream window (1 MiB) and, together,
/// than its connection window (4 MiB) get through: the server reads them and
/// opens the windows again as it goes.
#[tokio::test]
async fn messages_larger_than_the_flow_control_windows_are_stored() {
    let d = Daemon::start();
    let mut c = EvdbClient::new(channel(&d).await);
    let pad = "x".repeat(1000);
    let messages: Vec<ev::IngestRequest> = (0..3)
        .map(|m| ev::IngestRequest {
            events: (0..3000)
                .map(|i| ev::Event {
                    event_id: format!("big-{m}-{i:04}"),
                    timestamp: ts(1_738_756_800),
                    source_system: "s".into(),
                    event_type: "t".into(),
                    data_json: format!(r#"{{"pad":"{pad}"}}"#),
                    ..Default::default()
                })
                .collect(),
        })
        .collect();
    let bytes: usize = messages.iter().map(prost::Message::encoded_len).sum();
    assert!(bytes > 8 << 20, "{bytes} bytes");
    let r = c
        .ingest_stream(futures_util::stream::iter(messages))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.collected, r.duplicates, r.failed), (9000, 0, 0));
    assert_eq!(every_id(&mut c, None, 1000).await.len(), 9000);
}

/// Every event id `Query` finds for `filter`, oldest first, read in pages
/// of `limit` through the cursor.
async fn every_id(
    c: &mut EvdbClient<Channel>,
    filter: Option<ev::Filter>,
    limit: u32,
) -> Vec<String> {
    let mut seen = Vec::new();
    let mut cursor = String::new();
    loop {
        let r = c
            .query(ev::QueryRequest {
                filter: filter.clone(),
                limit,
                cursor: cursor.clone(),
                sort_order: ev::SortOrder::Asc as i32,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        seen.extend(r.events.into_iter().map(|e| e.event_id));
        if r.next_cursor.is_empty() {
            return seen;
        }
        cursor = r.next_cursor;
    }
}
