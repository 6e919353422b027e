//! The PKCS#11 module's operations on the data socket (`p11_*`): a login
//! for a session token, then objects and mechanisms under it. The HSM
//! decides what a login may see and use (see `tde_hsm::pkcs11`); this
//! checks the caller's policy, finds the token's operator and fills the
//! audit record.

use std::time::Duration;

use sha2::Digest as _;
use tde_hsm::pkcs11::Attrs;
use tde_hsm::{Caller, OperatorSession, Role};
use tde_protocol::message::{MAX_P11_PAGE, MAX_TEXT, truncate};
use tde_protocol::{ErrorCode, Op, P11Call, P11Key, P11ObjectInfo, Request, Response, SecretBytes};

use super::{MAX_TOKEN_TTL, Outcome, Service, hsm, key_info};
use crate::audit::AuditRecord;
use crate::policy::ClientPolicy;

/// A `p11_objects` page stops growing past this many bytes of attributes
/// (the frame cap is 1 MiB).
const PAGE_BYTES: usize = 512 * 1024;

/// `CKM_AES_GCM`: the one mechanism a master key takes.
const AES_GCM: u64 = 0x1087;

/// The session objects of a login are bound to its token: this names the
/// token without keeping it.
fn session_id(token: &SecretBytes) -> u64 {
    let h = sha2::Sha256::digest(token.expose());
    let mut b = [0u8; 8];
    b.copy_from_slice(&h[..8]);
    u64::from_be_bytes(b)
}

/// The audit fields of a PKCS#11 call: the key or object, the mechanism,
/// sizes. Never data.
pub(super) fn describe(c: &P11Call, rec: &mut AuditRecord) {
    match &c.key {
        P11Key::Master(name) => rec.key = super::audit_key(name),
        P11Key::Object(id) => rec.key = Some(format!("pkcs11:{id:016x}")),
        P11Key::None => {}
    }
    let mut d = format!("mechanism {:#x}", c.mechanism);
    if !c.data.expose().is_empty() {
        d.push_str(&format!(", {} bytes in", c.data.expose().len()));
    }
    if !c.aad.is_empty() {
        d.push_str(&format!(", {} bytes of AAD", c.aad.len()));
    }
    if c.target != 0 {
        d.push_str(&format!(", wraps pkcs11:{:016x}", c.target));
    }
    if let Some((_, label)) = c
        .template
        .iter()
        .find(|(t, _)| *t == tde_hsm::pkcs11::ck::CKA_LABEL)
    {
        d.push_str(&format!(
            ", label {:?}",
            truncate(&String::from_utf8_lossy(label), 128)
        ));
    }
    rec.detail = Some(d);
}

fn objects(list: Vec<tde_hsm::pkcs11::P11Object>) -> Vec<P11ObjectInfo> {
    list.into_iter()
        .map(|o| P11ObjectInfo {
            id: o.id,
            attrs: o.attrs,
        })
        .collect()
}

fn wrong(what: &str) -> (ErrorCode, String) {
    (ErrorCode::InvalidArgument, what.to_string())
}

impl Service {
    /// The PKCS#11 module's operations: the caller's policy must allow
    /// `pkcs11` (for the key, if a master key is named), and all but the
    /// login need its live token.
    pub(super) fn p11(&self, p: &ClientPolicy, req: &Request, rec: &mut AuditRecord) -> Outcome {
        let denied = |m: String| (ErrorCode::PermissionDenied, m);
        let key = match req {
            Request::P11(
                _,
                P11Call {
                    key: P11Key::Master(k),
                    ..
                },
            ) => Some(k.as_str()),
            _ => None,
        };
        p.allows_op_key("pkcs11", key).map_err(denied)?;
        // The token's operator, named in the record.
        let session = |token: &SecretBytes, rec: &mut AuditRecord| {
            let s = self.tokens.login(token.expose())?;
            rec.actor.operator = Some(s.name().to_string());
            rec.actor.role = Some(s.role().name());
            Ok::<_, (ErrorCode, String)>(s)
        };
        match req {
            Request::P11Login {
                operator,
                password,
                role,
            } => {
                let want = match role.as_str() {
                    "user" => Role::CryptoUser,
                    "so" => Role::CryptoOfficer,
                    _ => return Err(wrong("role must be user (CKU_USER) or so (CKU_SO)")),
                };
                // A wrong password counts toward the operator's lockout,
                // as on the admin socket.
                let s = hsm(self.hsm.login(operator, password.expose()))?;
                // The password is right but not for this user type: a
                // failed PKCS#11 login (CKR_PIN_INCORRECT), not counted.
                if s.role() != want {
                    return Err((
                        ErrorCode::LoginFailed,
                        format!(
                            "operator {:?} is a {}: CKU_USER needs a crypto user, CKU_SO a crypto officer",
                            truncate(operator, MAX_TEXT),
                            s.role().name()
                        ),
                    ));
                }
                rec.actor.role = Some(s.role().name());
                let token = self.tokens.create(s, Duration::from_secs(MAX_TOKEN_TTL))?;
                Ok(Response::Token {
                    token,
                    ttl: MAX_TOKEN_TTL,
                })
            }
            Request::P11Logout { token } => {
                // An unknown token is logged out already.
                let _ = session(token, rec);
                self.tokens.revoke(token.expose());
                self.hsm.p11_end_session(session_id(token));
                Ok(Response::Done)
            }
            Request::P11Objects { token, after } => {
                let s = session(token, rec)?;
                self.p11_objects(p, &s, session_id(token), *after)
            }
            Request::P11(op, c) => {
                let s = session(&c.token, rec)?;
                self.p11_call(*op, c, &s, rec)
            }
            _ => Err((
                ErrorCode::UnknownOperation,
                "not a PKCS#11 operation".into(),
            )),
        }
    }

    /// One page of a login's objects: on the first, the master keys it may
    /// use that the caller's policy names (none whose store object failed
    /// authentication); then its token and session objects by id.
    fn p11_objects(&self, p: &ClientPolicy, s: &OperatorSession, sid: u64, after: u64) -> Outcome {
        let keys = if after == 0 {
            let keys = match s.role() {
                Role::CryptoUser => hsm(self.hsm.keys_shared_with(s))?,
                _ => hsm(self.hsm.key_list(s))?,
            };
            keys.into_iter()
                .filter(|k| !k.tampered && p.allows_op_key("pkcs11", Some(&k.name)).is_ok())
                .map(|k| key_info(k, Vec::new()))
                .collect()
        } else {
            Vec::new()
        };
        let mut list = hsm(self.hsm.p11_list(s, sid))?
            .into_iter()
            .filter(|o| o.id > after)
            .peekable();
        let (mut page, mut bytes) = (Vec::new(), 0);
        while let Some(o) = list.peek() {
            let size: usize = o.attrs.iter().map(|(_, v)| v.len() + 16).sum();
            if page.len() >= MAX_P11_PAGE || (!page.is_empty() && bytes + size > PAGE_BYTES) {
                break;
            }
            bytes += size;
            page.extend(list.next());
        }
        Ok(Response::P11Objects {
            keys,
            objects: objects(page),
            more: list.peek().is_some(),
        })
    }

    /// Every `p11_*` operation after the login.
    fn p11_call(&self, op: Op, c: &P11Call, s: &OperatorSession, rec: &mut AuditRecord) -> Outcome {
        let sid = session_id(&c.token);
        let h = &self.hsm;
        let data = |d: Vec<u8>| {
            Ok(Response::P11Data {
                data: SecretBytes::new(d),
            })
        };
        let made = |list: Vec<tde_hsm::pkcs11::P11Object>| {
            Ok(Response::P11Objects {
                keys: Vec::new(),
                objects: objects(list),
                more: false,
            })
        };
        let template: &Attrs = &c.template;
        match (op, &c.key) {
            (Op::P11Encrypt | Op::P11Decrypt, P11Key::Master(name)) => {
                self.p11_master_gcm(op == Op::P11Encrypt, name, c, s, rec)
            }
            (Op::P11Encrypt | Op::P11Decrypt, P11Key::Object(id)) => {
                let out = hsm(h.p11_object_crypt(
                    s,
                    sid,
                    *id,
                    op == Op::P11Encrypt,
                    c.mechanism,
                    &c.param,
                    &c.aad,
                    c.data.expose(),
                ))?;
                Ok(Response::P11Data {
                    data: SecretBytes::from_slice(out.expose()),
                })
            }
            (Op::P11Sign, P11Key::Object(id)) => data(hsm(h.p11_sign(
                s,
                sid,
                *id,
                c.mechanism,
                &c.param,
                c.data.expose(),
            ))?),
            (Op::P11Verify, P11Key::Object(id)) => {
                hsm(h.p11_verify(
                    s,
                    sid,
                    *id,
                    c.mechanism,
                    &c.param,
                    c.data.expose(),
                    &c.signature,
                ))?;
                Ok(Response::Done)
            }
            (Op::P11Generate, P11Key::None) => {
                let list = hsm(h.p11_generate(s, sid, c.mechanism, template, &c.public_template))?;
                rec.detail = Some(format!(
                    "{}; made {}",
                    rec.detail.take().unwrap_or_default(),
                    list.iter()
                        .map(|o| format!("pkcs11:{:016x}", o.id))
                        .collect::<Vec<_>>()
                        .join(", ")
                ));
                made(list)
            }
            (Op::P11Create, P11Key::None) => {
                let o = hsm(h.p11_create(s, sid, template))?;
                rec.key = Some(format!("pkcs11:{:016x}", o.id));
                made(vec![o])
            }
            (Op::P11Destroy, P11Key::Object(id)) => {
                hsm(h.p11_destroy(s, sid, *id))?;
                Ok(Response::Done)
            }
            (Op::P11SetAttributes, P11Key::Object(id)) => {
                made(vec![hsm(h.p11_set(s, sid, *id, template))?])
            }
            (Op::P11Wrap, P11Key::Object(id)) => data(hsm(h.p11_wrap(
                s,
                sid,
                *id,
                c.mechanism,
                &c.param,
                c.target,
            ))?),
            (Op::P11Unwrap, P11Key::Object(id)) => {
                let o = hsm(h.p11_unwrap(
                    s,
                    sid,
                    *id,
                    c.mechanism,
                    &c.param,
                    c.data.expose(),
                    template,
                ))?;
                rec.detail = Some(format!(
                    "{}; made pkcs11:{:016x}",
                    rec.detail.take().unwrap_or_default(),
                    o.id
                ));
                made(vec![o])
            }
            (Op::P11Encrypt | Op::P11Decrypt, P11Key::None)
            | (Op::P11Generate | Op::P11Create, _) => Err(wrong(
                "encrypt and decrypt name a key or an object; generate and create name none",
            )),
            _ => Err(wrong("this PKCS#11 operation names an object (OBJECT)")),
        }
    }

    /// `CKM_AES_GCM` under a master key, for a crypto user the key is
    /// shared with.
    fn p11_master_gcm(
        &self,
        encrypt: bool,
        key: &str,
        c: &P11Call,
        s: &OperatorSession,
        rec: &mut AuditRecord,
    ) -> Outcome {
        if c.mechanism != AES_GCM {
            return Err((
                ErrorCode::Pkcs11,
                format!(
                    "CKR_MECHANISM_INVALID: mechanism {:#x} is not offered with master keys: CKM_AES_GCM (0x1087) is",
                    c.mechanism
                ),
            ));
        }
        let iv: &[u8; 12] = c.param.as_slice().try_into().map_err(|_| {
            (
                ErrorCode::Pkcs11,
                "CKR_MECHANISM_PARAM_INVALID: CKM_AES_GCM takes a 12-byte IV".to_string(),
            )
        })?;
        let caller = Caller::User(s);
        let data = if encrypt {
            rec.key_version = hsm(self.hsm.primary_version(caller, key)).ok();
            let out = hsm(self
                .hsm
                .p11_gcm_encrypt(caller, key, iv, &c.aad, c.data.expose()))?;
            SecretBytes::new(out)
        } else {
            let out = hsm(self
                .hsm
                .p11_gcm_decrypt(caller, key, iv, &c.aad, c.data.expose()))?;
            SecretBytes::from_slice(out.expose())
        };
        Ok(Response::P11Data { data })
    }
}
