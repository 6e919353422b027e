//! The `tde audit` operations on the admin socket: reading, exporting and
//! pruning the audit log, and its signing key.

use tde_hsm::{OperatorSession, Permission};
use tde_protocol::{AuditKeyInfo, AuditRange, ErrorCode, Request, Response};

use super::{Outcome, Service, hsm};
use crate::audit::{AuditError, Checkpoint, query};
use crate::audit::{AuditRecord, checkpoints_in};

/// Records deleted per transaction while pruning, so the audit writer and
/// the key store are never kept waiting long.
const PRUNE_BATCH: u64 = 10_000;

fn db(e: rusqlite::Error) -> (ErrorCode, String) {
    (
        ErrorCode::StoreFailed,
        format!("reading the audit log: {e}"),
    )
}

fn audit_failed(e: AuditError) -> (ErrorCode, String) {
    (ErrorCode::AuditFailed, e.to_string())
}

/// What a prune removed.
struct Pruned {
    first: u64,
    last: u64,
    /// Rows deleted.
    gone: usize,
    /// The checkpoint signed over them first.
    signed: Checkpoint,
}

impl Service {
    /// Prunes the exported records before `before_ms`, after signing a
    /// checkpoint over them; `None` if none may go.
    fn prune(&self, before_ms: u64) -> Result<Option<Pruned>, (ErrorCode, String)> {
        let conn = self.audit_conn()?;
        let Some((first, last)) = query::prunable(&conn, before_ms).map_err(db)? else {
            return Ok(None);
        };
        // Signed before anything goes: later exports start from it.
        let signed = self
            .audit
            .checkpoint_range("prune", first, last)
            .map_err(audit_failed)?;
        let mut gone = 0;
        while let n @ 1.. = query::prune_step(&conn, last, PRUNE_BATCH).map_err(db)? {
            gone += n;
        }
        Ok(Some(Pruned {
            first,
            last,
            gone,
            signed,
        }))
    }

    /// `audit.retention`: prunes what was exported and is older, as an
    /// `audit_prune` by the daemon (recorded when anything went).
    pub fn audit_retention(&self) {
        let keep = self
            .audit_retention_ms
            .load(std::sync::atomic::Ordering::Relaxed);
        if keep == 0 || self.hsm.status().sealed {
            return;
        }
        let before = crate::audit::now_ms().saturating_sub(keep);
        let mut rec = AuditRecord::new("internal", "audit_prune");
        match self.prune(before) {
            Ok(None) => return,
            Ok(Some(Pruned {
                first, last, gone, ..
            })) => {
                rec.detail = Some(format!(
                    "audit.retention: records {first}..={last} pruned ({gone} rows); checkpoint {last} keeps their chain head"
                ));
            }
            Err((code, why)) => {
                rec.result = "error";
                rec.error_code = Some(code.name());
                rec.detail = Some(format!("audit.retention: {why}"));
            }
        }
        if let Err(e) = self.audit.append(rec) {
            tracing::error!(error = %e, "could not audit the retention prune");
        }
    }

    fn audit_conn(&self) -> Result<rusqlite::Connection, (ErrorCode, String)> {
        crate::store::connect(self.registry.path())
            .map_err(|e| (ErrorCode::StoreFailed, e.to_string()))
    }

    fn audit_keys(&self) -> Result<Vec<AuditKeyInfo>, (ErrorCode, String)> {
        Ok(hsm(self.hsm.audit_public_keys())?
            .into_iter()
            .map(|k| AuditKeyInfo {
                version: k.version,
                created: k.created,
                public: k.public.to_vec(),
                active: k.active,
            })
            .collect())
    }

    /// Runs one audit operation for `by` (its role checked by the HSM).
    pub(super) fn audit_op(
        &self,
        by: &OperatorSession,
        req: &Request,
        rec: &mut AuditRecord,
    ) -> Outcome {
        let h = &self.hsm;
        let need = match req {
            Request::AuditPrune(_) => Permission::PruneAudit,
            Request::AuditKeyRotate => Permission::ManageKeys,
            _ => Permission::ReadAudit,
        };
        hsm(h.authorize(by, need))?;
        match req {
            Request::AuditList(q) => {
                let page = query::list(&self.audit_conn()?, q).map_err(db)?;
                rec.detail = Some(format!("{} records", page.records.len()));
                Ok(Response::AuditPage(page))
            }
            Request::AuditRead(q) => {
                let (Some(first), Some(last)) = (q.first_seq, q.last_seq) else {
                    return Err((
                        ErrorCode::InvalidArgument,
                        "audit_read needs first_seq and last_seq".into(),
                    ));
                };
                let page = query::read_page(&self.audit_conn()?, first, last).map_err(db)?;
                rec.detail = Some(format!(
                    "records {first}.. ({} read, up to {last})",
                    page.records.len()
                ));
                Ok(Response::AuditPage(page))
            }
            Request::AuditExport(q) => {
                let conn = self.audit_conn()?;
                let (first, last) = query::export_range(&conn, q).map_err(db)?.ok_or((
                    ErrorCode::InvalidArgument,
                    "no audit records in that range".to_string(),
                ))?;
                // The export's own checkpoint: its whole range, signed now.
                let signed = self
                    .audit
                    .checkpoint_range("export", first, last)
                    .map_err(audit_failed)?;
                let mut checkpoints = checkpoints_in(&conn, first - 1, first - 1).map_err(db)?;
                checkpoints.push(signed.to_line());
                rec.detail = Some(format!("records {first}..={last}"));
                Ok(Response::AuditRange(AuditRange {
                    store: signed.store,
                    node: signed.node,
                    first_seq: first,
                    last_seq: last,
                    checkpoints,
                    keys: self.audit_keys()?,
                }))
            }
            Request::AuditExportDone(q) => {
                let (Some(first), Some(last)) = (q.first_seq, q.last_seq) else {
                    return Err((
                        ErrorCode::InvalidArgument,
                        "audit_export_done needs first_seq and last_seq".into(),
                    ));
                };
                let conn = self.audit_conn()?;
                let exported = checkpoints_in(&conn, last, last)
                    .map_err(db)?
                    .iter()
                    .filter_map(|l| Checkpoint::parse(l).ok())
                    .any(|c| c.reason == "export" && c.first_seq == first);
                if !exported {
                    return Err((
                        ErrorCode::InvalidArgument,
                        format!(
                            "records {first}..={last} were not exported (no export checkpoint over them)"
                        ),
                    ));
                }
                query::record_export(&conn, first, last, crate::audit::now_ms(), by.name())
                    .map_err(db)?;
                rec.detail = Some(format!("records {first}..={last} exported"));
                Ok(Response::AuditRange(AuditRange {
                    first_seq: first,
                    last_seq: last,
                    ..AuditRange::default()
                }))
            }
            Request::AuditPrune(q) => {
                let before = q.until_ms.ok_or((
                    ErrorCode::InvalidArgument,
                    "audit_prune needs until_ms".to_string(),
                ))?;
                let Pruned {
                    first,
                    last,
                    gone,
                    signed,
                } = self.prune(before)?.ok_or((
                    ErrorCode::InvalidArgument,
                    "nothing to prune: no record before that time was exported (run `tde audit export` first), \
                     or a sink has not been given it yet"
                        .to_string(),
                ))?;
                rec.detail = Some(format!(
                    "records {first}..={last} pruned ({gone} rows); checkpoint {last} keeps their chain head"
                ));
                Ok(Response::AuditRange(AuditRange {
                    store: signed.store.clone(),
                    node: signed.node.clone(),
                    first_seq: first,
                    last_seq: last,
                    checkpoints: vec![signed.to_line()],
                    keys: Vec::new(),
                }))
            }
            Request::AuditPubkey => Ok(Response::AuditKeys(self.audit_keys()?)),
            Request::AuditKeyRotate => {
                // What the old version signs ends here.
                let _ = self.audit.checkpoint("key_rotate");
                let k = hsm(h.audit_key_rotate(by))?;
                rec.key_version = Some(k.version);
                rec.detail = Some(format!(
                    "audit signing key version {} signs from now on",
                    k.version
                ));
                Ok(Response::AuditKeys(self.audit_keys()?))
            }
            _ => Err((ErrorCode::Internal, "not an audit operation".into())),
        }
    }
}
