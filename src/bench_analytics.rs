//! `evdb bench analytics`: the seeds' analytics questions over seed-shaped
//! events spread across eight days, with `/latency_ms` declared as a
//! numeric field, each next to the same question asked of the SQLite
//! baseline (contract §6 schema; numbers read with `json_extract`, as the
//! schema has no column for them). evdb's answers are checked against
//! SQLite's before any figure is reported.

use std::collections::BTreeMap;

use rusqlite::params;

use crate::bench::{BenchOptions, Figure, percentile, progress, time_runs};
use crate::event::{Severity, Timestamp};
use crate::query::Query;
use crate::query::aggregate::{AggregateResult, Aggregation, AggregationText, MetricValue};

const DAY_US: i64 = 86_400_000_000;

fn request(filter: Query, text: AggregationText<'_>) -> anyhow::Result<Aggregation> {
    Ok(Aggregation::from_text(filter, &text)?)
}

fn number(v: MetricValue) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn figure(name: &str, n: u64, evdb: &mut [f64], sqlite: &mut [f64]) -> Figure {
    Figure::new(
        "analytics",
        name,
        n,
        "ms_p50",
        percentile(evdb, 0.5),
        "sqlite",
        percentile(sqlite, 0.5),
    )
}

/// Runs the suite on `opts.events` events.
pub fn analytics(opts: &BenchOptions) -> anyhow::Result<Vec<Figure>> {
    let n = opts.events;
    // Eight days of events whatever their number.
    let step_us = (8 * DAY_US / n.max(1) as i64).max(1);
    let ds = crate::bench::build_dataset_with(opts, step_us, &["/latency_ms"])?;
    let mut figures = Vec::new();
    let runs = 7;
    let sql_runs = 2;
    let start = crate::bench::START.as_micros();
    let end = start + 8 * DAY_US;
    let busiest_type = crate::generator::event_type(0);

    progress(
        opts,
        "analytics: error counts per day, one type, last 7 days",
    );
    let q1 = request(
        Query {
            types: vec![busiest_type.clone()],
            min_severity: Some(Severity::Error),
            start: Some(Timestamp(end - 7 * DAY_US)),
            end: Some(Timestamp(end)),
            ..Query::default()
        },
        AggregationText {
            bucket: Some("day"),
            metrics: Some("count"),
            limit: Some(100),
            ..AggregationText::default()
        },
    )?;
    let mut got = None;
    let mut evdb = time_runs(runs, |_| {
        got = Some(ds.db.aggregate(&q1)?);
        Ok(())
    })?;
    let mut stmt = ds.sqlite.prepare(
        "SELECT ts / 86400000000 AS day, count(*) FROM events
         WHERE event_type = ?1 AND severity >= 3 AND ts BETWEEN ?2 AND ?3
         GROUP BY day ORDER BY day",
    )?;
    let mut want: BTreeMap<i64, u64> = BTreeMap::new();
    let mut base = time_runs(sql_runs, |_| {
        want.clear();
        let mut rows = stmt.query(params![busiest_type, end - 7 * DAY_US, end])?;
        while let Some(r) = rows.next()? {
            want.insert(r.get::<_, i64>(0)? * DAY_US, r.get::<_, i64>(1)? as u64);
        }
        Ok(())
    })?;
    let got_days: BTreeMap<i64, u64> = got
        .as_ref()
        .map(|r| {
            r.groups
                .iter()
                .map(|g| {
                    (
                        g.bucket.map_or(0, Timestamp::as_micros),
                        number(g.values[0]) as u64,
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    anyhow::ensure!(
        got_days == want,
        "errors per day differ: evdb {got_days:?}, sqlite {want:?}"
    );
    figures.push(figure(
        "errors_per_day_one_type_7d",
        n,
        &mut evdb,
        &mut base,
    ));

    progress(opts, "analytics: top 100 sessions by error rate");
    let q2 = request(
        Query::default(),
        AggregationText {
            group_by: vec!["correlation_id"],
            metrics: Some("count,error_rate"),
            order_by: Some("error_rate"),
            limit: Some(100),
            ..AggregationText::default()
        },
    )?;
    let mut got: Option<AggregateResult> = None;
    let mut evdb = time_runs(runs, |_| {
        got = Some(ds.db.aggregate(&q2)?);
        Ok(())
    })?;
    let mut stmt = ds.sqlite.prepare(
        "SELECT correlation_id, count(*), avg(severity >= 3) AS rate FROM events
         WHERE correlation_id IS NOT NULL
         GROUP BY correlation_id ORDER BY rate DESC, correlation_id LIMIT 100",
    )?;
    let mut top: Vec<(String, f64)> = Vec::new();
    let mut base = time_runs(sql_runs, |_| {
        top.clear();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            top.push((r.get(0)?, r.get(2)?));
        }
        Ok(())
    })?;
    let got_top: Vec<(String, f64)> = got
        .as_ref()
        .map(|r| {
            r.groups
                .iter()
                .filter(|g| g.key[0].is_some())
                .map(|g| (g.key[0].clone().unwrap_or_default(), number(g.values[1])))
                .collect()
        })
        .unwrap_or_default();
    let rates = |v: &[(String, f64)]| v.iter().map(|x| x.1).take(50).collect::<Vec<_>>();
    anyhow::ensure!(
        rates(&got_top) == rates(&top),
        "top sessions by error rate differ: evdb {:?}, sqlite {:?}",
        &got_top[..got_top.len().min(5)],
        &top[..top.len().min(5)]
    );
    figures.push(figure(
        "top100_sessions_by_error_rate",
        n,
        &mut evdb,
        &mut base,
    ));

    progress(opts, "analytics: p95 latency per event type");
    let q3 = request(
        Query::default(),
        AggregationText {
            group_by: vec!["type"],
            metrics: Some("count,p95(/latency_ms)"),
            limit: Some(1000),
            ..AggregationText::default()
        },
    )?;
    let mut got: Option<AggregateResult> = None;
    let mut evdb = time_runs(runs, |_| {
        got = Some(ds.db.aggregate(&q3)?);
        Ok(())
    })?;
    // SQLite has no percentile aggregate: rank within each type.
    let mut stmt = ds.sqlite.prepare(
        "SELECT event_type, v FROM (
           SELECT event_type, v,
                  row_number() OVER (PARTITION BY event_type ORDER BY v) AS rn,
                  count(*) OVER (PARTITION BY event_type) AS n
           FROM (SELECT event_type, json_extract(data, '$.latency_ms') AS v FROM events)
           WHERE v IS NOT NULL)
         WHERE rn = CAST(0.95 * (n - 1) AS INTEGER) + 1",
    )?;
    let mut want: BTreeMap<String, f64> = BTreeMap::new();
    let mut base = time_runs(1, |_| {
        want.clear();
        let mut rows = stmt.query([])?;
        while let Some(r) = rows.next()? {
            want.insert(r.get(0)?, r.get(1)?);
        }
        Ok(())
    })?;
    if let Some(r) = &got {
        anyhow::ensure!(r.groups.len() == want.len(), "p95: group counts differ");
        let tolerance = crate::query::aggregate::SKETCH_RELATIVE_ERROR;
        for g in &r.groups {
            let t = g.key[0].clone().unwrap_or_default();
            let (e, w) = (
                number(g.values[1]),
                want.get(&t).copied().unwrap_or(f64::NAN),
            );
            anyhow::ensure!(
                (e - w).abs() <= tolerance * w.abs() + 1e-9,
                "p95 of {t}: evdb {e}, sqlite {w}"
            );
        }
    }
    figures.push(figure("p95_latency_per_type", n, &mut evdb, &mut base));

    progress(opts, "analytics: sum and avg of latency over everything");
    let q4 = request(
        Query::default(),
        AggregationText {
            metrics: Some("sum(/latency_ms),avg(/latency_ms)"),
            ..AggregationText::default()
        },
    )?;
    let mut got: Option<AggregateResult> = None;
    let mut evdb = time_runs(runs, |_| {
        got = Some(ds.db.aggregate(&q4)?);
        Ok(())
    })?;
    let mut sums = (0.0, 0.0);
    let mut base = time_runs(sql_runs, |_| {
        sums = ds.sqlite.query_row(
            "SELECT sum(json_extract(data, '$.latency_ms')), avg(json_extract(data, '$.latency_ms')) FROM events",
            [],
            |r| Ok((r.get::<_, f64>(0)?, r.get::<_, f64>(1)?)),
        )?;
        Ok(())
    })?;
    if let Some(r) = &got {
        let s = number(r.totals[0]);
        anyhow::ensure!(
            (s - sums.0).abs() <= 1e-9 * sums.0.abs(),
            "sum differs: evdb {s}, sqlite {}",
            sums.0
        );
    }
    figures.push(figure("sum_avg_latency_all", n, &mut evdb, &mut base));

    progress(
        opts,
        "analytics: sum of an undeclared field (records decoded)",
    );
    let q5 = request(
        Query::default(),
        AggregationText {
            metrics: Some("sum(/items)"),
            ..AggregationText::default()
        },
    )?;
    let mut evdb = time_runs(1, |_| {
        ds.db.aggregate(&q5)?;
        Ok(())
    })?;
    let mut base = time_runs(1, |_| {
        ds.sqlite.query_row(
            "SELECT sum(json_extract(data, '$.items')) FROM events",
            [],
            |r| r.get::<_, f64>(0),
        )?;
        Ok(())
    })?;
    figures.push(figure("sum_undeclared_field_all", n, &mut evdb, &mut base));
    ds.db.close()?;
    Ok(figures)
}
