//! The typed, blocking client of the sidecar's sockets, used by the CLI, the
//! mount and the re-key: one method per operation, each returning that
//! operation's answer, and one error type, [`ClientError`], that tells a
//! refusal by the sidecar (with its [`ErrorCode`]) from a connection that
//! failed. Nobody outside this module matches a [`Response`] by hand.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::frame::{read_frame, write_frame};
use crate::message::{
    ApprovalInfo, AuditKeyInfo, AuditPage, AuditQuery, AuditRange, Context, DekRef, KeyInfo,
    OperatorInfo, ResplitInfo, StatusInfo,
};
use crate::{ErrorCode, Op, P11Call, P11ObjectInfo, Request, Response, SecretBytes};

/// How long a call waits for its answer (a `watch_key` waits at most 60 s
/// on the server, and is asked for less).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(90);

/// Why a call failed.
#[derive(Debug)]
pub enum ClientError {
    /// The socket could not be reached.
    Connect {
        /// The socket.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Sending or receiving failed, or the sidecar closed the connection.
    Transport {
        /// What was being done.
        doing: &'static str,
        /// Why.
        source: std::io::Error,
    },
    /// The answer could not be decoded, or answered another request.
    BadResponse(String),
    /// The sidecar refused the request.
    Refused {
        /// What kind of refusal.
        code: ErrorCode,
        /// The sidecar's reason, for a person.
        message: String,
    },
}

impl ClientError {
    /// The sidecar's refusal code; `None` when the connection failed.
    pub fn refused(&self) -> Option<ErrorCode> {
        match self {
            ClientError::Refused { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The request never reached the sidecar (no connection, or the
    /// connection was already closed when it was sent), so sending it
    /// again on a new connection cannot do it twice.
    pub fn unsent(&self) -> bool {
        matches!(
            self,
            ClientError::Connect { .. } | ClientError::Transport { doing: SENDING, .. }
        )
    }
}

const SENDING: &str = "sending the request";

impl std::fmt::Display for ClientError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClientError::Connect { path, source } => write!(
                f,
                "cannot connect to {}: {source}; is `tde serve` running, and is this the right socket (TDE_DATA_DIR / --config / --sidecar)?",
                path.display()
            ),
            ClientError::Transport { doing, source } => write!(f, "{doing}: {source}"),
            ClientError::BadResponse(why) => write!(f, "bad response from the sidecar: {why}"),
            ClientError::Refused { code, message } => write!(f, "{message} ({code})"),
        }
    }
}

impl std::error::Error for ClientError {
    // The message already says the cause (`{source}` above): giving it as
    // the source too would print it twice in every error chain.
}

/// A data key from `generate_data_key`.
#[derive(Debug)]
pub struct DataKey {
    /// The master key's name.
    pub key: String,
    /// The master key version that wrapped it.
    pub version: u32,
    /// The data key.
    pub plaintext: SecretBytes,
    /// The wrapped data key.
    pub ciphertext: Vec<u8>,
}

/// A data key from `decrypt`.
#[derive(Debug)]
pub struct Decrypted {
    /// The master key's name.
    pub key: String,
    /// The master key version that had wrapped it.
    pub version: u32,
    /// The data key.
    pub plaintext: SecretBytes,
}

/// A data key rewrapped by `re_encrypt`.
#[derive(Debug)]
pub struct ReEncrypted {
    /// The master key's name.
    pub key: String,
    /// The version it is wrapped under now.
    pub version: u32,
    /// The version it was wrapped under.
    pub source_version: u32,
    /// The new wrapped data key.
    pub ciphertext: Vec<u8>,
}

/// One connection to a sidecar socket. Requests on it are answered in
/// order; an admin connection keeps its operator login.
#[derive(Debug)]
pub struct Client {
    stream: UnixStream,
    next_id: u64,
}

/// Calls `req` and destructures the answer it must have.
macro_rules! expect {
    ($self:ident, $req:expr, $pat:pat => $out:expr) => {{
        let req = $req;
        match $self.call(&req)? {
            $pat => Ok($out),
            _ => Err(unexpected(req.op())),
        }
    }};
}

fn unexpected(op: Op) -> ClientError {
    ClientError::BadResponse(format!("an answer of another kind to {}", op.name()))
}

impl Client {
    /// Connects to the socket at `path`.
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path).map_err(|source| ClientError::Connect {
            path: path.to_path_buf(),
            source,
        })?;
        stream
            .set_read_timeout(Some(CALL_TIMEOUT))
            .map_err(|source| ClientError::Transport {
                doing: "setting the socket's timeout",
                source,
            })?;
        Ok(Client {
            stream,
            next_id: u64::from(std::process::id()) << 32,
        })
    }

    /// Another handle on the connection's socket (to shut it down from
    /// another thread, which ends a call waiting on it).
    pub fn stream_clone(&self) -> std::io::Result<UnixStream> {
        self.stream.try_clone()
    }

    /// Sends any request and returns its answer; a refusal is
    /// [`ClientError::Refused`]. The typed methods below are built on it.
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.next_id += 1;
        write_frame(&mut self.stream, &req.to_frame(self.next_id)).map_err(|source| {
            ClientError::Transport {
                doing: SENDING,
                source,
            }
        })?;
        let frame = read_frame(&mut self.stream)
            .map_err(|source| ClientError::Transport {
                doing: "reading the response",
                source,
            })?
            .ok_or_else(|| ClientError::Transport {
                doing: "reading the response",
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the sidecar closed the connection",
                ),
            })?;
        if frame.header.request_id != self.next_id {
            return Err(ClientError::BadResponse(
                "an answer to another request (id mismatch)".into(),
            ));
        }
        match Response::from_frame(&frame).map_err(|e| ClientError::BadResponse(e.to_string()))? {
            Response::Error { code, message } => Err(ClientError::Refused { code, message }),
            r => Ok(r),
        }
    }

    /// `status`: seal state and identity.
    pub fn status(&mut self) -> Result<StatusInfo, ClientError> {
        expect!(self, Request::Status, Response::Status(s) => s)
    }

    /// `unseal`: gives one share; the state after it.
    pub fn unseal(&mut self, share: SecretBytes) -> Result<StatusInfo, ClientError> {
        expect!(self, Request::Unseal { share }, Response::Status(s) => s)
    }

    /// `seal`: drops every key from memory.
    pub fn seal(&mut self) -> Result<StatusInfo, ClientError> {
        expect!(self, Request::Seal, Response::Status(s) => s)
    }

    /// `login` on the admin socket; gives the operator's role.
    pub fn login(&mut self, operator: &str, password: SecretBytes) -> Result<String, ClientError> {
        expect!(self, Request::Login { operator: operator.into(), password },
            Response::LoggedIn { role, .. } => role)
    }

    /// `p11_login` (data socket): a session token for the operator, in
    /// `role` `user` or `so`, and its lifetime in seconds.
    pub fn p11_login(
        &mut self,
        operator: &str,
        password: SecretBytes,
        role: &str,
    ) -> Result<(SecretBytes, u64), ClientError> {
        expect!(self, Request::P11Login { operator: operator.into(), password, role: role.into() },
            Response::Token { token, ttl } => (token, ttl))
    }

    /// `p11_logout` (data socket): the token ends.
    pub fn p11_logout(&mut self, token: SecretBytes) -> Result<(), ClientError> {
        expect!(self, Request::P11Logout { token }, Response::Done => ())
    }

    /// `p11_objects` (data socket), every page: the master keys the
    /// token's operator may use (a crypto user: those shared with it; an
    /// officer: all) among those the caller's policy names, and its token
    /// and session objects.
    pub fn p11_objects(
        &mut self,
        token: &SecretBytes,
    ) -> Result<(Vec<KeyInfo>, Vec<P11ObjectInfo>), ClientError> {
        let (mut keys, mut objects) = (Vec::new(), Vec::new());
        let mut after = 0;
        loop {
            let req = Request::P11Objects {
                token: SecretBytes::from_slice(token.expose()),
                after,
            };
            let (k, o, more) = expect!(self, req,
                Response::P11Objects { keys, objects, more } => (keys, objects, more))?;
            keys.extend(k);
            let last = o.last().map(|x| x.id);
            objects.extend(o);
            match last {
                Some(id) if more && id > after => after = id,
                _ => return Ok((keys, objects)),
            }
        }
    }

    /// A PKCS#11 operation that answers with bytes (`p11_encrypt`,
    /// `p11_decrypt`, `p11_sign`, `p11_wrap`).
    pub fn p11_data(&mut self, op: Op, c: P11Call) -> Result<SecretBytes, ClientError> {
        expect!(self, Request::P11(op, c), Response::P11Data { data } => data)
    }

    /// A PKCS#11 operation that answers with objects (`p11_generate`,
    /// `p11_create`, `p11_set_attributes`, `p11_unwrap`).
    pub fn p11_make(&mut self, op: Op, c: P11Call) -> Result<Vec<P11ObjectInfo>, ClientError> {
        expect!(self, Request::P11(op, c), Response::P11Objects { objects, .. } => objects)
    }

    /// A PKCS#11 operation that answers only success (`p11_verify`,
    /// `p11_destroy`).
    pub fn p11_done(&mut self, op: Op, c: P11Call) -> Result<(), ClientError> {
        expect!(self, Request::P11(op, c), Response::Done => ())
    }

    /// `zeroize`: destroys the root material for ever.
    pub fn zeroize(&mut self) -> Result<(), ClientError> {
        expect!(self, Request::Zeroize, Response::Done => ())
    }

    /// A session token for the operator logged in on this connection:
    /// the token and its lifetime in seconds.
    pub fn token_create(&mut self, ttl: u64) -> Result<(SecretBytes, u64), ClientError> {
        expect!(self, Request::TokenCreate { ttl }, Response::Token { token, ttl } => (token, ttl))
    }

    /// Logs this connection in with a session token; gives the role.
    pub fn token_login(&mut self, token: SecretBytes) -> Result<(String, String), ClientError> {
        expect!(self, Request::TokenLogin { token },
            Response::LoggedIn { operator, role } => (operator, role))
    }

    /// Revokes a session token.
    pub fn token_revoke(&mut self, token: SecretBytes) -> Result<(), ClientError> {
        expect!(self, Request::TokenRevoke { token }, Response::Done => ())
    }

    /// Starts a re-split of the unseal shares (a crypto officer); with
    /// `custodian_keys` (OpenPGP public keys, one per new share), each new
    /// share comes back encrypted to its key.
    pub fn resplit_init(
        &mut self,
        threshold: u32,
        shares: u32,
        custodian_keys: Vec<Vec<u8>>,
    ) -> Result<ResplitInfo, ClientError> {
        expect!(self, Request::ResplitInit { threshold, shares, custodian_keys },
            Response::Resplit(r) => r)
    }

    /// Gives one current share to the re-split `nonce`.
    pub fn resplit_update(
        &mut self,
        nonce: &str,
        share: SecretBytes,
    ) -> Result<ResplitInfo, ClientError> {
        expect!(self, Request::ResplitUpdate { nonce: nonce.into(), share },
            Response::Resplit(r) => r)
    }

    /// Where the re-split stands (`nonce` empty: none).
    pub fn resplit_status(&mut self) -> Result<ResplitInfo, ClientError> {
        expect!(self, Request::ResplitStatus, Response::Resplit(r) => r)
    }

    /// Cancels the re-split (a crypto officer).
    pub fn resplit_cancel(&mut self) -> Result<(), ClientError> {
        expect!(self, Request::ResplitCancel, Response::Done => ())
    }

    /// The requests waiting for approvals.
    pub fn approvals(&mut self) -> Result<Vec<ApprovalInfo>, ClientError> {
        expect!(self, Request::ApprovalList, Response::Approvals(a) => a)
    }

    /// Approves request `id` (another crypto officer); gives its state.
    pub fn approve(&mut self, id: u64) -> Result<ApprovalInfo, ClientError> {
        let req = Request::Approve { id };
        self.one_approval(&req)
    }

    /// Request `id`'s approvals and outcome.
    pub fn approval(&mut self, id: u64) -> Result<ApprovalInfo, ClientError> {
        let req = Request::ApprovalStatus { id };
        self.one_approval(&req)
    }

    fn one_approval(&mut self, req: &Request) -> Result<ApprovalInfo, ClientError> {
        match self.call(req)? {
            Response::Approvals(mut a) if a.len() == 1 => Ok(a.remove(0)),
            _ => Err(unexpected(req.op())),
        }
    }

    /// Audit records matching `q` (`audit_list`).
    pub fn audit_list(&mut self, q: AuditQuery) -> Result<AuditPage, ClientError> {
        expect!(self, Request::AuditList(q), Response::AuditPage(p) => p)
    }

    /// Starts an export: its range, anchor checkpoints and keys.
    pub fn audit_export(&mut self, q: AuditQuery) -> Result<AuditRange, ClientError> {
        expect!(self, Request::AuditExport(q), Response::AuditRange(r) => r)
    }

    /// One page of records from `first` up to `last`, verbatim.
    pub fn audit_read(&mut self, first: u64, last: u64) -> Result<AuditPage, ClientError> {
        let q = AuditQuery {
            first_seq: Some(first),
            last_seq: Some(last),
            ..AuditQuery::default()
        };
        expect!(self, Request::AuditRead(q), Response::AuditPage(p) => p)
    }

    /// Records that the export of `first..=last` is complete.
    pub fn audit_export_done(&mut self, first: u64, last: u64) -> Result<AuditRange, ClientError> {
        let q = AuditQuery {
            first_seq: Some(first),
            last_seq: Some(last),
            ..AuditQuery::default()
        };
        expect!(self, Request::AuditExportDone(q), Response::AuditRange(r) => r)
    }

    /// Prunes exported records before `before_ms`; the range removed.
    pub fn audit_prune(&mut self, before_ms: u64) -> Result<AuditRange, ClientError> {
        let q = AuditQuery {
            until_ms: Some(before_ms),
            ..AuditQuery::default()
        };
        expect!(self, Request::AuditPrune(q), Response::AuditRange(r) => r)
    }

    /// The audit signing key's versions.
    pub fn audit_pubkey(&mut self) -> Result<Vec<AuditKeyInfo>, ClientError> {
        expect!(self, Request::AuditPubkey, Response::AuditKeys(k) => k)
    }

    /// Rotates the audit signing key; every version after.
    pub fn audit_key_rotate(&mut self) -> Result<Vec<AuditKeyInfo>, ClientError> {
        expect!(self, Request::AuditKeyRotate, Response::AuditKeys(k) => k)
    }

    /// Re-reads the daemon's configuration; returns what changed.
    pub fn reload(&mut self) -> Result<String, ClientError> {
        expect!(self, Request::Reload, Response::Reloaded { message } => message)
    }

    /// `operator_add`.
    pub fn operator_add(
        &mut self,
        operator: &str,
        role: &str,
        password: SecretBytes,
    ) -> Result<(), ClientError> {
        expect!(self, Request::OperatorAdd { operator: operator.into(), role: role.into(), password },
            Response::Done => ())
    }

    /// `operator_passwd`.
    pub fn operator_passwd(
        &mut self,
        operator: &str,
        password: SecretBytes,
    ) -> Result<(), ClientError> {
        expect!(self, Request::OperatorPasswd { operator: operator.into(), password },
            Response::Done => ())
    }

    /// `operator_unlock`.
    pub fn operator_unlock(&mut self, operator: &str) -> Result<(), ClientError> {
        expect!(self, Request::OperatorUnlock { operator: operator.into() }, Response::Done => ())
    }

    /// `operator_remove`.
    pub fn operator_remove(&mut self, operator: &str) -> Result<(), ClientError> {
        expect!(self, Request::OperatorRemove { operator: operator.into() }, Response::Done => ())
    }

    /// `operator_list`.
    pub fn operator_list(&mut self) -> Result<Vec<OperatorInfo>, ClientError> {
        expect!(self, Request::OperatorList, Response::Operators(o) => o)
    }

    /// `key_list`.
    pub fn key_list(&mut self) -> Result<Vec<KeyInfo>, ClientError> {
        expect!(self, Request::KeyList, Response::Keys(k) => k)
    }

    /// Any operation on one master key (`key_create`, `key_describe`,
    /// `key_rotate`, `key_disable`, ...): the key as it is afterwards.
    pub fn key(&mut self, req: Request) -> Result<KeyInfo, ClientError> {
        expect!(self, req, Response::Key(k) => k)
    }

    /// `key_create`, optionally with an automatic rotation period
    /// (seconds, 0 for none) set in the same step.
    pub fn key_create(
        &mut self,
        key: &str,
        description: &str,
        rotate_after: u64,
    ) -> Result<KeyInfo, ClientError> {
        self.key(Request::KeyCreate {
            key: key.into(),
            description: description.into(),
            rotate_after,
        })
    }

    /// `key_describe`.
    pub fn key_describe(&mut self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key(Request::KeyDescribe { key: key.into() })
    }

    /// `key_rotate`: a new primary version.
    pub fn key_rotate(&mut self, key: &str) -> Result<KeyInfo, ClientError> {
        self.key(Request::KeyRotate { key: key.into() })
    }

    /// `key_disable` of one version, or of all when `None`.
    pub fn key_disable(&mut self, key: &str, version: Option<u32>) -> Result<KeyInfo, ClientError> {
        self.key(Request::KeyDisable {
            key: key.into(),
            version,
        })
    }

    /// `generate_data_key` under the primary version of `key`.
    pub fn generate_data_key(
        &mut self,
        key: &str,
        context: &Context,
    ) -> Result<DataKey, ClientError> {
        expect!(self, Request::GenerateDataKey { key: key.into(), context: context.clone() },
            Response::DataKey { key, version, plaintext, ciphertext } =>
                DataKey { key, version, plaintext, ciphertext })
    }

    /// `decrypt`: the data key inside a wrapped blob.
    pub fn decrypt(
        &mut self,
        ciphertext: &[u8],
        context: &Context,
    ) -> Result<Decrypted, ClientError> {
        expect!(self, Request::Decrypt { ciphertext: ciphertext.to_vec(), context: context.clone() },
            Response::Decrypted { key, version, plaintext } =>
                Decrypted { key, version, plaintext })
    }

    /// `re_encrypt`: the blob rewrapped under the primary version, without
    /// the data key leaving the HSM.
    pub fn re_encrypt(
        &mut self,
        ciphertext: &[u8],
        context: &Context,
    ) -> Result<ReEncrypted, ClientError> {
        expect!(self, Request::ReEncrypt { ciphertext: ciphertext.to_vec(), context: context.clone() },
            Response::ReEncrypted { key, version, source_version, ciphertext } =>
                ReEncrypted { key, version, source_version, ciphertext })
    }

    /// `generate_random`.
    pub fn generate_random(&mut self, length: u32) -> Result<SecretBytes, ClientError> {
        expect!(self, Request::GenerateRandom { length }, Response::Random { bytes } => bytes)
    }

    /// `register_deks`: the master key's primary version.
    pub fn register_deks(
        &mut self,
        key: &str,
        context: &Context,
        location: &str,
        deks: Vec<DekRef>,
    ) -> Result<u32, ClientError> {
        expect!(self, Request::RegisterDeks {
                key: key.into(),
                context: context.clone(),
                location: location.into(),
                deks,
            },
            Response::KeyPrimary { version, .. } => version)
    }

    /// `rekey_report`: tells the sidecar (its audit log) where a mount's
    /// re-key stands.
    #[allow(clippy::too_many_arguments)]
    pub fn rekey_report(
        &mut self,
        key: &str,
        context: &Context,
        location: &str,
        state: &str,
        target: u32,
        done: u64,
        total: u64,
    ) -> Result<(), ClientError> {
        expect!(self, Request::RekeyReport {
                key: key.into(),
                context: context.clone(),
                location: location.into(),
                state: state.into(),
                target,
                done,
                total,
            },
            Response::Done => ())
    }

    /// `watch_key`: the primary version once it is not `version`, or after
    /// `timeout`.
    pub fn watch_key(
        &mut self,
        key: &str,
        version: u32,
        timeout: Duration,
    ) -> Result<u32, ClientError> {
        let timeout_ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        expect!(self, Request::WatchKey { key: key.into(), version, timeout_ms },
            Response::KeyPrimary { version, .. } => version)
    }
}
