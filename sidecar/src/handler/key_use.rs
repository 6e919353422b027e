//! `audit.pkcs11_key_use = "summarize"`: successful PKCS#11 signatures,
//! verifications, encryptions and decryptions are counted instead of
//! recorded one by one, and written once a second as one record per
//! process, operator, key, operation and mechanism, with the count and the
//! first and last time. A TLS server or an engine signing or encrypting
//! thousands of times a second then costs a record a second, not a durable
//! record (and a wait for it) per call.
//!
//! Fail closed: if a summary cannot be written, its counts are kept and
//! every key use is recorded one by one again (each waits for its record,
//! and is refused if the log cannot take it) until a summary is written.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use tde_protocol::{Op, Request};

use super::lock;
use crate::audit::{Actor, AuditRecord, now_ms, rfc3339_ms};

/// Most distinct tallies between two summaries; past it, uses are
/// recorded one by one (a peer cannot grow the table without bound). The
/// requests already past [`KeyUses::candidate`] when it fills may add a
/// few more.
const MAX_TALLIES: usize = 4096;

/// What one tally counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq)]
struct Use {
    socket: &'static str,
    actor: Actor,
    op: String,
    key: Option<String>,
    mechanism: u64,
}

#[derive(Debug, Clone, Copy)]
struct Tally {
    count: u64,
    first_ms: u64,
    last_ms: u64,
}

/// The counted key uses since the last summary.
#[derive(Debug)]
pub struct KeyUses {
    on: AtomicBool,
    /// The last summary could not be written.
    failing: AtomicBool,
    tallies: Mutex<HashMap<Use, Tally>>,
}

impl KeyUses {
    /// Counting if `on` (`audit.pkcs11_key_use = "summarize"`).
    pub fn new(on: bool) -> Self {
        KeyUses {
            on: on.into(),
            failing: false.into(),
            tallies: Mutex::default(),
        }
    }

    /// `audit.pkcs11_key_use` changed (a reload). What was counted is
    /// written at the next summary either way.
    pub fn set(&self, on: bool) {
        self.on.store(on, Ordering::SeqCst);
    }

    /// The mechanism of `req` if its success is to be counted, not
    /// recorded: a PKCS#11 key use while summaries are on, written, and
    /// the table has room.
    pub fn candidate(&self, req: &Request) -> Option<u64> {
        if !self.on.load(Ordering::Relaxed) || self.failing.load(Ordering::Relaxed) {
            return None;
        }
        match req {
            Request::P11(Op::P11Sign | Op::P11Verify | Op::P11Encrypt | Op::P11Decrypt, c)
                if lock(&self.tallies).len() < MAX_TALLIES =>
            {
                Some(c.mechanism)
            }
            _ => None,
        }
    }

    /// Counts the successful use `rec` describes (a
    /// [`KeyUses::candidate`]).
    pub fn count(&self, rec: &AuditRecord, mechanism: u64) {
        let u = Use {
            socket: rec.socket,
            actor: rec.actor.clone(),
            op: rec.op.clone(),
            key: rec.key.clone(),
            mechanism,
        };
        let now = now_ms();
        lock(&self.tallies)
            .entry(u)
            .and_modify(|x| {
                x.count += 1;
                x.last_ms = now;
            })
            .or_insert(Tally {
                count: 1,
                first_ms: now,
                last_ms: now,
            });
    }

    /// Writes one record per tally with `append` (true: durable). Those
    /// the log refuses are kept for the next summary, and until one is
    /// written uses are recorded one by one.
    pub fn flush(&self, mut append: impl FnMut(AuditRecord) -> bool) {
        let tallies = std::mem::take(&mut *lock(&self.tallies));
        let mut left = Vec::new();
        for (u, t) in tallies {
            if !left.is_empty() || !append(summary(&u, t)) {
                left.push((u, t));
            }
        }
        let failing = !left.is_empty();
        if failing != self.failing.swap(failing, Ordering::SeqCst) {
            if failing {
                tracing::error!(
                    "the PKCS#11 key-use summary could not be written; recording each use again"
                );
            } else {
                tracing::info!("PKCS#11 key-use summaries are written again");
            }
        }
        let mut t = lock(&self.tallies);
        for (u, kept) in left {
            t.entry(u)
                .and_modify(|x| {
                    x.count += kept.count;
                    x.first_ms = x.first_ms.min(kept.first_ms);
                })
                .or_insert(kept);
        }
    }
}

fn summary(u: &Use, t: Tally) -> AuditRecord {
    let mut rec = AuditRecord::new(u.socket, u.op.clone());
    rec.actor = u.actor.clone();
    rec.key = u.key.clone();
    rec.count = Some(t.count);
    rec.detail = Some(format!(
        "{} successful {} calls with mechanism {:#x} from {} to {} (audit.pkcs11_key_use = summarize)",
        t.count,
        u.op,
        u.mechanism,
        rfc3339_ms(t.first_ms),
        rfc3339_ms(t.last_ms)
    ));
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use tde_protocol::{P11Call, P11Key, SecretBytes};

    fn sign_call(mechanism: u64) -> Request {
        let mut c = P11Call::new(SecretBytes::from_slice(b"token"));
        c.key = P11Key::Object(7);
        c.mechanism = mechanism;
        Request::P11(Op::P11Sign, c)
    }

    fn used(pid: i32, key: &str) -> AuditRecord {
        let mut r = AuditRecord::new("data", "p11_sign");
        r.actor.pid = Some(pid);
        r.key = Some(key.into());
        r
    }

    #[test]
    fn only_key_uses_are_candidates_and_only_when_on() {
        let k = KeyUses::new(false);
        assert_eq!(k.candidate(&sign_call(0x1041)), None);
        k.set(true);
        assert_eq!(k.candidate(&sign_call(0x1041)), Some(0x1041));
        let mut wrap = P11Call::new(SecretBytes::from_slice(b"token"));
        wrap.mechanism = 0x2109;
        assert_eq!(k.candidate(&Request::P11(Op::P11Wrap, wrap)), None);
        k.failing.store(true, Ordering::SeqCst);
        assert_eq!(k.candidate(&sign_call(0x1041)), None);
    }

    #[test]
    fn uses_are_tallied_per_process_and_key_up_to_a_cap() {
        let k = KeyUses::new(true);
        for _ in 0..3 {
            k.count(&used(1, "pkcs11:a"), 0x1041);
        }
        k.count(&used(2, "pkcs11:a"), 0x1041);
        k.count(&used(1, "pkcs11:a"), 0x1044);
        {
            let t = lock(&k.tallies);
            assert_eq!(t.len(), 3);
            let mut counts: Vec<u64> = t.values().map(|x| x.count).collect();
            counts.sort_unstable();
            assert_eq!(counts, [1, 1, 3]);
        }
        for pid in 3..(MAX_TALLIES as i32) {
            assert!(k.candidate(&sign_call(0x1041)).is_some());
            k.count(&used(pid, "pkcs11:a"), 0x1041);
        }
        assert_eq!(
            k.candidate(&sign_call(0x1041)),
            None,
            "full: recorded one by one"
        );
        k.flush(|_| true);
        assert!(k.candidate(&sign_call(0x1041)).is_some(), "room again");
    }

    #[test]
    fn a_summary_the_log_refuses_is_kept_and_uses_are_recorded_until_one_is_written() {
        let k = KeyUses::new(true);
        for _ in 0..5 {
            k.count(&used(1, "pkcs11:a"), 0x1041);
        }
        k.count(&used(2, "pkcs11:b"), 0x1041);
        let mut tried = 0;
        k.flush(|_| {
            tried += 1;
            false
        });
        assert_eq!(tried, 1, "the first refusal stops the summary");
        assert_eq!(k.candidate(&sign_call(0x1041)), None, "recorded one by one");
        k.count(&used(1, "pkcs11:a"), 0x1041);
        let mut written = Vec::new();
        k.flush(|r| {
            written.push((r.actor.pid, r.count));
            true
        });
        written.sort_unstable();
        assert_eq!(written, [(Some(1), Some(6)), (Some(2), Some(1))]);
        assert_eq!(
            k.candidate(&sign_call(0x1041)),
            Some(0x1041),
            "counted again"
        );
        let mut none = 0;
        k.flush(|_| {
            none += 1;
            true
        });
        assert_eq!(none, 0, "nothing twice");
    }

    #[test]
    fn a_summary_names_the_count_the_mechanism_and_the_process() {
        let u = Use {
            socket: "data",
            actor: used(42, "k").actor,
            op: "p11_sign".into(),
            key: Some("pkcs11:00000000000000ff".into()),
            mechanism: 0x1041,
        };
        let r = summary(
            &u,
            Tally {
                count: 12,
                first_ms: 1_000,
                last_ms: 2_000,
            },
        );
        assert_eq!(r.count, Some(12));
        assert_eq!(r.actor.pid, Some(42));
        assert_eq!(r.key.as_deref(), Some("pkcs11:00000000000000ff"));
        let d = r.detail.expect("detail");
        assert!(
            d.starts_with("12 successful p11_sign calls with mechanism 0x1041"),
            "{d}"
        );
    }
}
