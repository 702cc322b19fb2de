//! SHOW STATS: one row per database, like PgBouncer's: transactions, requests, bytes each way,
//! re-preparations, holds with their average and longest wait, and what held requests took
//! from their first byte to their answer (50th and 99th percentile, maximum).
//!
//! Invariant: counts include the live sessions; times are whole microseconds.

use std::time::Duration;

use bytes::BytesMut;

use crate::proxy::messages;
use crate::proxy::shared::Shared;

/// The columns, in order.
pub const COLUMNS: [&str; 12] = [
    "database",
    "total_xact_count",
    "total_query_count",
    "total_received",
    "total_sent",
    "total_reprepared",
    "total_holds",
    "avg_hold_wait_us",
    "max_hold_wait_us",
    "held_p50_us",
    "held_p99_us",
    "held_max_us",
];

fn us(d: Duration) -> String {
    d.as_micros().to_string()
}

pub fn show_stats(shared: &Shared, out: &mut BytesMut) {
    messages::row_description(out, &COLUMNS);
    let report = shared.stats_report();
    for (db, t) in &report {
        let avg = match u32::try_from(t.holds) {
            Ok(n) if n > 0 => t.hold_wait_sum / n,
            _ => Duration::ZERO,
        };
        let row = [
            db.clone(),
            t.xacts.to_string(),
            t.queries.to_string(),
            t.bytes_in.to_string(),
            t.bytes_out.to_string(),
            t.reprepared.to_string(),
            t.holds.to_string(),
            us(avg),
            us(t.hold_wait_max),
            us(t.held_p50),
            us(t.held_p99),
            us(t.held_max),
        ];
        messages::data_row(out, &row.map(Some));
    }
    messages::command_complete(out, &format!("SHOW {}", report.len()));
}
