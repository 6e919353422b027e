//! Reading the audit log for `tde audit`: filtered lists, an export's
//! range and pages, the record of exports, and pruning.
//!
//! Records are append-only and numbered, so a range fixed by its first and
//! last sequence numbers reads the same however long it takes and whatever
//! is appended meanwhile: that is the export's consistent snapshot, with
//! no read transaction held across pages. Pruning removes only records an
//! export covered, so it never takes from a range still being exported
//! after it was exported (a second export of the same range after a prune
//! is refused for what is gone).

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tde_protocol::{AuditPage, AuditQuery};

use super::checkpoints_in;

/// Records a list returns when no limit is given.
pub const DEFAULT_LIMIT: u32 = 100;
/// Most records a list returns.
pub const MAX_LIMIT: u32 = 10_000;
/// Bytes of records and checkpoints in one answer (under a frame).
pub const PAGE_BYTES: usize = 900 * 1024;

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn u(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

/// The oldest and newest sequence numbers present (`None` when empty).
pub fn bounds(conn: &Connection) -> rusqlite::Result<Option<(u64, u64)>> {
    // Two queries: SQLite seeks the index for a lone min() or max(), and
    // scans the table for both in one.
    let end = |sql: &str| -> rusqlite::Result<Option<u64>> {
        conn.prepare_cached(sql)?
            .query_row([], |r| r.get::<_, i64>(0))
            .optional()
            .map(|v| v.map(u))
    };
    Ok(
        match (
            end("SELECT seq FROM audit ORDER BY seq LIMIT 1")?,
            end("SELECT seq FROM audit ORDER BY seq DESC LIMIT 1")?,
        ) {
            (Some(a), Some(b)) => Some((a, b)),
            _ => None,
        },
    )
}

/// The first record at or after `t` (`after`), or the last before it:
/// times never decrease along the chain, so a binary search over sequence
/// numbers finds it (about 20 lookups by primary key for a million).
fn seq_by_time(conn: &Connection, t: u64, after: bool) -> rusqlite::Result<Option<u64>> {
    let Some((lo, hi)) = bounds(conn)? else {
        return Ok(None);
    };
    let mut st = conn.prepare_cached(
        "SELECT COALESCE(time_ms, 0) FROM audit WHERE seq >= ?1 ORDER BY seq LIMIT 1",
    )?;
    let mut time_at =
        |s: u64| -> rusqlite::Result<u64> { st.query_row([i(s)], |r| r.get::<_, i64>(0)).map(u) };
    // The first record whose time is at or after `t` (hi + 1 if none).
    let (mut a, mut b) = (lo, hi + 1);
    while a < b {
        let mid = a + (b - a) / 2;
        if time_at(mid)? >= t {
            b = mid;
        } else {
            a = mid + 1;
        }
    }
    Ok(if after {
        (a <= hi).then_some(a)
    } else {
        (a > lo).then(|| a - 1)
    })
}

/// Whether record `r` (parsed) passes the filters that are not SQL.
fn matches(q: &AuditQuery, r: &Value) -> bool {
    if let Some(a) = &q.actor {
        let actor = &r["actor"];
        let hit = actor["operator"].as_str() == Some(a)
            || actor["client"].as_str() == Some(a)
            || actor["uid"]
                .as_u64()
                .is_some_and(|uid| *a == format!("uid:{uid}"));
        if !hit {
            return false;
        }
    }
    q.context
        .iter()
        .all(|(k, v)| r["context"][k].as_str() == Some(v.as_str()))
}

/// Records matching `q`, oldest first (the newest ones with `newest`),
/// at most `limit` and [`PAGE_BYTES`].
pub fn list(conn: &Connection, q: &AuditQuery) -> rusqlite::Result<AuditPage> {
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT) as usize;
    let sql = format!(
        "SELECT record FROM audit
         WHERE seq >= ?1 AND seq <= ?2 AND time_ms >= ?3 AND time_ms < ?4
           AND (?5 IS NULL OR json_extract(record, '$.op') = ?5)
           AND (?6 IS NULL OR json_extract(record, '$.key') = ?6)
           AND (?7 IS NULL OR json_extract(record, '$.result') = ?7)
         ORDER BY seq {}",
        if q.newest { "DESC" } else { "ASC" }
    );
    let mut st = conn.prepare(&sql)?;
    let mut rows = st.query(params![
        i(q.first_seq.unwrap_or(0)),
        i(q.last_seq.unwrap_or(u64::MAX)),
        i(q.since_ms.unwrap_or(0)),
        i(q.until_ms.unwrap_or(u64::MAX)),
        q.operation,
        q.key,
        q.result,
    ])?;
    let mut page = AuditPage::default();
    let mut bytes = 0;
    while let Some(row) = rows.next()? {
        let text: String = row.get(0)?;
        let keep = serde_json::from_str::<Value>(&text).is_ok_and(|v| matches(q, &v));
        if !keep {
            continue;
        }
        bytes += text.len();
        if bytes > PAGE_BYTES || page.records.len() >= limit {
            break;
        }
        page.records.push(text);
    }
    if q.newest {
        page.records.reverse();
    }
    page.head = bounds(conn)?.map_or(0, |b| b.1);
    Ok(page)
}

/// The range an export of `q` covers: `first_seq`/`since_ms` to
/// `last_seq`/`until_ms`, within the records present. `None` if empty.
pub fn export_range(conn: &Connection, q: &AuditQuery) -> rusqlite::Result<Option<(u64, u64)>> {
    let Some((lo, hi)) = bounds(conn)? else {
        return Ok(None);
    };
    let mut first = q.first_seq.unwrap_or(lo).max(lo);
    let mut last = q.last_seq.unwrap_or(hi).min(hi);
    if let Some(t) = q.since_ms {
        match seq_by_time(conn, t, true)? {
            Some(s) => first = first.max(s),
            None => return Ok(None),
        }
    }
    if let Some(t) = q.until_ms {
        match seq_by_time(conn, t, false)? {
            Some(s) => last = last.min(s),
            None => return Ok(None),
        }
    }
    Ok((first <= last).then_some((first, last)))
}

/// Records `first..` up to `last` and [`PAGE_BYTES`], verbatim, with the
/// checkpoints whose last record is among them.
pub fn read_page(conn: &Connection, first: u64, last: u64) -> rusqlite::Result<AuditPage> {
    let mut st = conn.prepare_cached(
        "SELECT seq, record FROM audit WHERE seq >= ?1 AND seq <= ?2 ORDER BY seq LIMIT ?3",
    )?;
    let mut rows = st.query(params![
        i(first),
        i(last),
        i(tde_protocol::message::MAX_RECORDS as u64)
    ])?;
    let mut page = AuditPage::default();
    let mut bytes = 0;
    let mut end = None;
    while let Some(row) = rows.next()? {
        let text: String = row.get(1)?;
        bytes += text.len() + 4;
        if bytes > PAGE_BYTES && !page.records.is_empty() {
            break;
        }
        end = Some(u(row.get(0)?));
        page.records.push(text);
    }
    if let Some(end) = end {
        page.checkpoints = checkpoints_in(conn, first, end)?;
    }
    page.head = bounds(conn)?.map_or(0, |b| b.1);
    Ok(page)
}

/// Records an export of `first..=last` by `operator`.
pub fn record_export(
    conn: &Connection,
    first: u64,
    last: u64,
    time_ms: u64,
    operator: &str,
) -> rusqlite::Result<()> {
    conn.execute(
        "INSERT INTO audit_export (first_seq, last_seq, time_ms, operator) VALUES (?1, ?2, ?3, ?4)",
        params![i(first), i(last), i(time_ms), operator],
    )?;
    Ok(())
}

/// The last record that may be pruned before `before_ms`: older than it
/// and, from the oldest record on without a gap, inside exported ranges.
/// `None` if nothing may be.
pub fn prunable(conn: &Connection, before_ms: u64) -> rusqlite::Result<Option<(u64, u64)>> {
    let Some((lo, _)) = bounds(conn)? else {
        return Ok(None);
    };
    let Some(by_time) = seq_by_time(conn, before_ms, false)? else {
        return Ok(None);
    };
    let mut st = conn.prepare("SELECT first_seq, last_seq FROM audit_export ORDER BY first_seq")?;
    let mut covered = lo - 1;
    for r in st.query_map([], |r| Ok((u(r.get(0)?), u(r.get(1)?))))? {
        let (a, b) = r?;
        if a <= covered + 1 {
            covered = covered.max(b);
        }
    }
    // Never what a sink has not been given yet.
    let sinks: Option<i64> = conn.query_row("SELECT min(seq) FROM audit_sink", [], |r| r.get(0))?;
    let last = by_time.min(covered).min(sinks.map_or(u64::MAX, u));
    Ok((last >= lo).then_some((lo, last)))
}

/// Deletes records up to `last`, at most `batch` of them; how many went.
pub fn prune_step(conn: &Connection, last: u64, batch: u64) -> rusqlite::Result<usize> {
    conn.execute(
        "DELETE FROM audit WHERE seq IN (SELECT seq FROM audit WHERE seq <= ?1 ORDER BY seq LIMIT ?2)",
        params![i(last), i(batch)],
    )
}
