//! `tde`: the command line of the TDE key manager. It only wires the crates
//! together: `tde-hsm` (the HSM), `tde-sidecar` (the daemon) and
//! `tde-protocol` (the client side of the wire protocol).
#![forbid(unsafe_code)]
// The doc comments of clap types are the help text; flattened groups have none.
#![allow(missing_docs)]

mod audit_cmd;
mod cmd;
mod demo;
mod envelope;
mod pkcs11_cmd;
mod progress;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

/// Key manager for transparent data encryption: a software HSM in a sidecar
/// daemon that wraps per-tablespace data keys for a database.
#[derive(Parser, Debug)]
#[command(name = "tde", version, about, long_about = None)]
pub struct Cli {
    /// Configuration file (TOML). `TDE_` environment variables override it,
    /// e.g. TDE_DATA_DIR.
    #[arg(long, global = true, env = "TDE_CONFIG")]
    pub config: Option<PathBuf>,
    /// Data directory (overrides the configuration and TDE_DATA_DIR).
    #[arg(long, global = true)]
    pub data_dir: Option<PathBuf>,
    /// Admin socket (default: from the configuration).
    #[arg(long, global = true)]
    pub admin_socket: Option<PathBuf>,
    /// Data socket (default: from the configuration).
    #[arg(long, global = true)]
    pub data_socket: Option<PathBuf>,
    /// Operator to log in as for admin commands (default `admin`). Given
    /// to `tde datakey`, the request goes over the admin socket as that
    /// crypto user, for keys shared with it.
    #[arg(long, global = true, env = "TDE_OPERATOR")]
    pub operator: Option<String>,
    /// File holding the operator's password (else TDE_PASSWORD, the dev
    /// password file, or a prompt).
    #[arg(long, global = true)]
    pub password_file: Option<PathBuf>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

impl Cli {
    /// The operator admin commands log in as.
    pub fn operator(&self) -> &str {
        self.operator.as_deref().unwrap_or("admin")
    }
}

/// Commands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a self-contained demonstration on a temporary dev store.
    Demo,
    /// Create the key store: root key, unseal shares, first crypto officer.
    Init(InitArgs),
    /// Run the sidecar daemon.
    Serve(ServeArgs),
    /// Log in as an operator once (like `vault login`): the password buys a
    /// session token, kept in ~/.config/tde/token (0600), that later admin
    /// commands use until it expires or is revoked.
    Login {
        /// Lifetime of the token (at most 12h).
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
    /// Revoke the saved session token and delete it.
    Logout,
    /// Show seal status and this store's mounts. Exits 0 unsealed, 2
    /// sealed (or not initialized, or zeroized), 1 if the sidecar cannot be
    /// reached (as `vault status`).
    Status {
        /// List every `tde mount` on the host, not only this store's.
        #[arg(long)]
        all: bool,
    },
    /// Give one unseal share.
    Unseal {
        /// The share text: visible to every local user, so prefer the
        /// hidden prompt (on a terminal), standard input (piped), or
        /// --share-file.
        share: Option<String>,
        /// File holding the share (`-`: standard input).
        #[arg(long)]
        share_file: Option<PathBuf>,
    },
    /// Seal: wipe keys from the daemon's memory.
    Seal,
    /// List the requests waiting for approvals (dual control), or show one.
    Approvals {
        /// The request.
        id: Option<u64>,
    },
    /// Approve another crypto officer's request (`[quorum]`); the last
    /// approval runs it.
    Approve {
        /// The request.
        id: u64,
    },
    /// Re-split the unseal shares into a new set (custodian turnover), as
    /// `vault operator rekey`: an officer starts it (--init), a threshold
    /// of the current shares approves it, no key is touched.
    Resplit(ResplitArgs),
    /// Make the daemon re-read its configuration (as SIGHUP does): client
    /// policies, log level, most limits. Needs a crypto officer.
    Reload,
    /// Zeroize: destroy the root material for ever (like an HSM's zeroize).
    Zeroize {
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Manage operators.
    #[command(subcommand)]
    Operator(OperatorCmd),
    /// Manage master keys.
    #[command(subcommand)]
    Key(KeyCmd),
    /// Data-socket client policies: which would allow a request, and why.
    #[command(subcommand)]
    Policy(PolicyCmd),
    /// The audit log: list, follow, export for auditors, verify an export
    /// offline, prune what was exported, print the signing keys.
    #[command(subcommand)]
    Audit(AuditCmd),
    /// Data-key operations (like `aws kms generate-data-key`).
    #[command(subcommand)]
    Datakey(DatakeyCmd),
    /// Encrypt a file under a fresh data key from the sidecar (envelope
    /// encryption, like the AWS Encryption CLI): streaming and
    /// authenticated; the wrapped data key travels in the file's header.
    Encrypt(EncryptArgs),
    /// Decrypt a file made by `tde encrypt` (the sidecar unwraps its data
    /// key); a changed or cut file is refused.
    Decrypt(DecryptArgs),
    /// The PKCS#11 module's tokens and objects, as an application loading
    /// libtde_pkcs11.so sees them.
    #[command(subcommand)]
    Pkcs11(Pkcs11Cmd),
    /// Mount an encrypted directory (FUSE) for a tablespace or a cluster.
    Mount(MountArgs),
    /// Unmount a `tde mount`.
    Umount {
        /// The mountpoint.
        mountpoint: PathBuf,
    },
    /// Re-encrypt a mounted tablespace under a new data key version, online
    /// (or pause, resume, throttle or watch a running re-key).
    Rekey(RekeyArgs),
    /// Print a shell completion script: `source <(tde completions bash)`,
    /// or save it where the shell looks (see OPERATIONS.md).
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Write the manual pages (tde.1, and one per subcommand such as
    /// tde-key-create.1) into a directory.
    Man {
        /// Directory to write them into (created if missing).
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
    /// Count a backing directory's blocks per data key version (reads the
    /// block trailers; no key needed).
    Inspect {
        /// The backing directory.
        backing_dir: PathBuf,
    },
    /// Rewrap an unmounted tablespace's data keys under its master key's
    /// newest version (mounted ones do it by themselves after a rotation).
    Rewrap {
        /// The backing directory (holds the key file).
        backing_dir: PathBuf,
        /// The sidecar's data socket (default: from the configuration).
        #[arg(long)]
        sidecar: Option<PathBuf>,
    },
}

/// `tde resplit`.
#[derive(Args, Debug)]
pub struct ResplitArgs {
    /// Start a re-split (a crypto officer), replacing one in progress.
    #[arg(long, requires_all = ["shares", "threshold"], conflicts_with_all = ["nonce", "cancel"])]
    pub init: bool,
    /// With --init: the number of new shares.
    #[arg(long)]
    pub shares: Option<u8>,
    /// With --init: the new shares needed to unseal.
    #[arg(long)]
    pub threshold: Option<u8>,
    /// Cancel the re-split in progress (a crypto officer).
    #[arg(long, conflicts_with = "nonce")]
    pub cancel: bool,
    /// Give one current share to the re-split with this nonce (without
    /// --init, --cancel or --nonce: show the re-split in progress).
    #[arg(long)]
    pub nonce: Option<String>,
    /// The current share as an argument (visible to every local user:
    /// prefer the prompt, standard input or --share-file).
    #[arg(long)]
    pub share: Option<String>,
    /// File holding the current share (`-`: standard input).
    #[arg(long)]
    pub share_file: Option<PathBuf>,
    /// When done, also write each new share to DIR/share-N (mode 0600;
    /// share-N.asc when encrypted to custodian keys).
    #[arg(long)]
    pub share_dir: Option<PathBuf>,
    /// With --init: encrypt each new share to one custodian's OpenPGP
    /// public key (files, comma-separated, one per share). The daemon
    /// encrypts them: no new share leaves it in clear.
    #[arg(long, value_delimiter = ',', requires = "init")]
    pub pgp_keys: Vec<PathBuf>,
}

/// `tde rekey`.
#[derive(Args, Debug)]
pub struct RekeyArgs {
    /// The mountpoint of a running `tde mount`.
    pub mountpoint: PathBuf,
    /// Throttle: 50MB/s, 200M, 1GB/s; 0 or `unlimited` for none. With a
    /// running re-key, changes its throttle.
    #[arg(long)]
    pub rate: Option<String>,
    /// Pause the running re-key (it stays paused across a remount).
    #[arg(long, conflicts_with_all = ["resume", "status"])]
    pub pause: bool,
    /// Resume a paused re-key.
    #[arg(long, conflicts_with_all = ["pause", "status"])]
    pub resume: bool,
    /// Show the progress and return.
    #[arg(long)]
    pub status: bool,
    /// Start (or change) and return without following the progress.
    #[arg(long)]
    pub no_wait: bool,
}

/// `tde encrypt`.
#[derive(Args, Debug)]
pub struct EncryptArgs {
    /// Master key to wrap the file's data key.
    #[arg(long)]
    pub key: String,
    /// Encryption context, stored in the header; decrypting needs a policy
    /// that allows it.
    #[command(flatten)]
    pub ctx: ContextArgs,
    /// Where to write (default INPUT.tde; `-`: standard output).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// The file to encrypt (`-`: standard input).
    pub input: PathBuf,
}

/// `tde decrypt`.
#[derive(Args, Debug)]
pub struct DecryptArgs {
    /// Context entries the file must carry (checked before anything is
    /// asked of the sidecar), as `aws-encryption-cli --encryption-context`.
    #[command(flatten)]
    pub ctx: ContextArgs,
    /// Where to write (default INPUT without `.tde`; `-`: standard output,
    /// where chunks are written as they authenticate).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Replace OUTPUT if it exists.
    #[arg(long)]
    pub force: bool,
    /// The encrypted file (`-`: standard input).
    pub input: PathBuf,
}

/// `tde mount`.
#[derive(Args, Debug)]
pub struct MountArgs {
    /// Create the key file with a new data key (empty backing directory).
    #[arg(long)]
    pub init: bool,
    /// The sidecar's data socket (default: from the configuration).
    #[arg(long)]
    pub sidecar: Option<PathBuf>,
    /// Master key that wraps the data key (needed with --init).
    #[arg(long)]
    pub key: Option<String>,
    /// Tablespace name: bound into the encryption context and every block.
    #[arg(long)]
    pub tablespace: String,
    /// Cluster id: bound into the encryption context.
    #[arg(long, default_value = "default")]
    pub cluster: String,
    /// Seconds to wait for an unreachable or sealed sidecar (default 60;
    /// under systemd, as long as it takes).
    #[arg(long)]
    pub wait: Option<u64>,
    /// FUSE worker threads.
    #[arg(long, default_value_t = tde_plugin::mount::DEFAULT_THREADS)]
    pub threads: usize,
    /// Run in the background once mounted.
    #[arg(long)]
    pub daemon: bool,
    /// As a normal user: let other users use the mount too (needs
    /// `user_allow_other` in /etc/fuse.conf). A mount made by root always
    /// allows them (PostgreSQL runs as its own user).
    #[arg(long)]
    pub allow_other: bool,
    /// Mount even on a directory a running PostgreSQL uses as its data
    /// directory or a tablespace location when the backing directory does
    /// not hold those files (refused otherwise: it would hide them).
    #[arg(long)]
    pub force: bool,
    /// With --daemon: where the mount logs (default
    /// /var/log/tde/mount-TABLESPACE.log as root,
    /// ~/.local/state/tde/mount-TABLESPACE.log otherwise).
    #[arg(long)]
    pub log_file: Option<PathBuf>,
    /// Directory holding the ciphertext.
    pub backing_dir: PathBuf,
    /// Where the plaintext appears.
    pub mountpoint: PathBuf,
}

/// `tde init`.
#[derive(Args, Debug)]
pub struct InitArgs {
    /// Number of unseal shares.
    #[arg(long, default_value_t = 5)]
    pub shares: u8,
    /// Shares needed to unseal.
    #[arg(long, default_value_t = 3)]
    pub threshold: u8,
    /// Dev mode: one share kept in a local file, auto-unseal. Not for
    /// production.
    #[arg(long)]
    pub dev: bool,
    /// Also write each share to DIR/share-N (mode 0600; share-N.asc when
    /// encrypted to custodian keys).
    #[arg(long)]
    pub share_dir: Option<PathBuf>,
    /// Do not ask for confirmation on a terminal.
    #[arg(long)]
    pub yes: bool,
    /// Encrypt each share to one custodian's OpenPGP public key (files,
    /// comma-separated, one per share, as `gpg --export` writes them): no
    /// share is ever shown in clear.
    #[arg(long, value_delimiter = ',', conflicts_with = "dev")]
    pub pgp_keys: Vec<PathBuf>,
}

/// `tde serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Dev mode: initialize a dev store if there is none (in ./tde-dev unless
    /// a data directory is configured), auto-unseal, allow the current user.
    #[arg(long)]
    pub dev: bool,
    /// Print the effective configuration (secrets redacted) and exit.
    #[arg(long)]
    pub print_config: bool,
}

/// `tde operator`.
#[derive(Subcommand, Debug)]
pub enum OperatorCmd {
    /// Add an operator (password from TDE_NEW_PASSWORD, --new-password-file
    /// or a prompt).
    Add {
        /// Name.
        name: String,
        /// crypto_officer, crypto_user or auditor.
        #[arg(long)]
        role: String,
        /// File holding the new operator's password.
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
    /// Change an operator's password.
    Passwd {
        /// Name.
        name: String,
        /// File holding the new password.
        #[arg(long)]
        new_password_file: Option<PathBuf>,
    },
    /// Remove an operator (its logins end at once). Not yourself; a crypto
    /// user's keys must be unshared first.
    Remove {
        /// Name.
        name: String,
    },
    /// Unlock an operator locked by failed logins.
    Unlock {
        /// Name.
        name: String,
    },
    /// List operators.
    List,
}

/// `tde key`.
#[derive(Subcommand, Debug)]
pub enum KeyCmd {
    /// Create a master key.
    Create {
        /// Name.
        name: String,
        /// Free text.
        #[arg(long, default_value = "")]
        description: String,
        /// Rotate automatically when the primary version is this old
        /// (e.g. 90d, 12h, 30m, 45s).
        #[arg(long)]
        rotate_after: Option<String>,
    },
    /// Set or turn off automatic rotation: `tde key set-rotation pg 90d`,
    /// `tde key set-rotation pg off`.
    SetRotation {
        /// Name.
        name: String,
        /// Period (90d, 12h, 30m, 45s) or `off`.
        period: String,
    },
    /// Let a crypto user use a key over the admin socket
    /// (`tde datakey --operator USER`).
    Share {
        /// Key name.
        name: String,
        /// The crypto user.
        user: String,
    },
    /// Take a crypto user's use of a key away.
    Unshare {
        /// Key name.
        name: String,
        /// The crypto user.
        user: String,
    },
    /// List master keys.
    List,
    /// Show a master key and its versions.
    Show {
        /// Name.
        name: String,
    },
    /// Rotate: a new version becomes primary.
    Rotate {
        /// Name.
        name: String,
    },
    /// Disable a version (or all).
    Disable(VersionArgs),
    /// Enable a version (or all).
    Enable(VersionArgs),
    /// Schedule destruction of a version (or the whole key).
    ScheduleDestroy {
        #[command(flatten)]
        target: VersionArgs,
        /// Waiting period in days.
        #[arg(long, default_value_t = 7)]
        days: u32,
        /// Even if registered data keys still use it.
        #[arg(long)]
        force: bool,
    },
    /// Cancel a scheduled destruction.
    CancelDestroy(VersionArgs),
    /// Destroy a version (or the whole key) now. Irreversible.
    Destroy {
        #[command(flatten)]
        target: VersionArgs,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
        /// Even if registered data keys still use it (their tablespaces
        /// are gone).
        #[arg(long)]
        force: bool,
    },
}

/// `tde audit`.
#[derive(Subcommand, Debug)]
pub enum AuditCmd {
    /// List records (the newest 100 unless told otherwise).
    List {
        #[command(flatten)]
        filter: AuditFilter,
        /// Most records.
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// The oldest matching records instead of the newest.
        #[arg(long)]
        oldest: bool,
    },
    /// Show the newest records, and with -f follow new ones as they come.
    Tail {
        #[command(flatten)]
        filter: AuditFilter,
        /// Records shown first.
        #[arg(short = 'n', long, default_value_t = 10)]
        lines: u32,
        /// Keep following (Ctrl-C stops).
        #[arg(short = 'f', long)]
        follow: bool,
    },
    /// Export a range to a directory: the records, a rendering, a manifest
    /// with every checkpoint over them and the public keys.
    Export(AuditExportArgs),
    /// Check an export offline (no sidecar, no store). Exits 0 if it
    /// verifies, 1 if not.
    Verify(AuditVerifyArgs),
    /// Delete exported records older than a time (auditors), leaving a
    /// signed checkpoint that later exports chain from.
    Prune {
        /// Records before this time (RFC 3339, or an age like 90d).
        #[arg(long)]
        before: String,
        /// Do not ask for confirmation.
        #[arg(long)]
        yes: bool,
    },
    /// Print the audit signing key's public keys (PEM), to pin them.
    Pubkey {
        /// Write them to this file too.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Rotate the audit signing key (crypto officers).
    RotateKey,
}

/// Filters of `tde audit list` and `tail`.
#[derive(Args, Debug)]
pub struct AuditFilter {
    /// Records at or after (RFC 3339, or an age like 2h).
    #[arg(long)]
    pub since: Option<String>,
    /// Records before (RFC 3339, or an age).
    #[arg(long)]
    pub until: Option<String>,
    /// Operator, client policy, or uid:N.
    #[arg(long)]
    pub actor: Option<String>,
    /// Operation (decrypt, key_rotate, login, ...).
    #[arg(long)]
    pub operation: Option<String>,
    /// Master key.
    #[arg(long)]
    pub key: Option<String>,
    /// ok, error or pending.
    #[arg(long)]
    pub result: Option<String>,
    #[command(flatten)]
    pub ctx: ContextArgs,
}

/// `tde audit export`.
#[derive(Args, Debug)]
pub struct AuditExportArgs {
    /// Directory to create.
    #[arg(long)]
    pub out: PathBuf,
    /// Records at or after (RFC 3339, or an age like 24h).
    #[arg(long)]
    pub since: Option<String>,
    /// Records before (RFC 3339, or an age).
    #[arg(long)]
    pub until: Option<String>,
    /// Start right after the previous export in this directory.
    #[arg(long, conflicts_with = "since")]
    pub after: Option<PathBuf>,
    /// jsonl, csv or ocsf (records.jsonl is always there: it is what
    /// verify checks the rendering against).
    #[arg(long, default_value = "jsonl")]
    pub format: String,
}

/// `tde audit verify`.
#[derive(Args, Debug)]
pub struct AuditVerifyArgs {
    /// The export directory.
    pub dir: PathBuf,
    /// The export before it: this one must continue it (no gap, no fork).
    #[arg(long)]
    pub previous: Option<PathBuf>,
    /// Public keys to trust (PEM, from `tde audit pubkey`); without, the
    /// export's own keys are used and the verdict says so.
    #[arg(long)]
    pub pubkey: Option<PathBuf>,
    /// A file sink's copy of the log to compare with.
    #[arg(long)]
    pub sink: Option<PathBuf>,
    /// Records allowed after the last checkpoint (an export made by tde
    /// signs its whole range).
    #[arg(long, default_value_t = 0)]
    pub max_unsigned: u64,
}

/// `tde pkcs11`.
#[derive(Subcommand, Debug)]
pub enum Pkcs11Cmd {
    /// List the tokens (one per configured sidecar: the module's
    /// configuration, else this sidecar) and, logged in as --operator, the
    /// objects that login sees: a crypto officer (CKU_SO) every master key
    /// and token object, a crypto user (--user, CKU_USER) its shared master
    /// keys and its own objects.
    List {
        /// Log in as a crypto user (CKU_USER) instead of an officer.
        #[arg(long)]
        user: bool,
        /// Only the tokens: no login, no objects.
        #[arg(long)]
        no_login: bool,
    },
}

/// `tde policy`.
#[derive(Subcommand, Debug)]
pub enum PolicyCmd {
    /// Say which `[[clients]]` policy of the configuration (users and
    /// groups resolved as `tde serve` does) covers a peer, and whether it
    /// allows a request. Exits 0 if allowed, 1 if refused.
    Check(PolicyCheckArgs),
}

/// `tde policy check`.
#[derive(Args, Debug)]
pub struct PolicyCheckArgs {
    /// The peer's user (name or uid). A `tde mount` talks to the sidecar
    /// as the user that runs it (root, or the normal user who mounted).
    #[arg(long)]
    pub user: String,
    /// The peer's primary group (name or gid; default: the user's).
    #[arg(long)]
    pub group: Option<String>,
    /// Master key name.
    #[arg(long)]
    pub key: String,
    /// Operation (default: those a `tde mount` needs: generate_data_key,
    /// decrypt, re_encrypt).
    #[arg(long)]
    pub operation: Option<String>,
    #[command(flatten)]
    pub ctx: ContextArgs,
}

/// A key and optionally one version.
#[derive(Args, Debug)]
pub struct VersionArgs {
    /// Key name.
    pub name: String,
    /// Version (default: all).
    #[arg(long)]
    pub version: Option<u32>,
}

/// `tde datakey`.
#[derive(Subcommand, Debug)]
pub enum DatakeyCmd {
    /// Generate a data key wrapped under a master key.
    Generate {
        /// Master key.
        #[arg(long)]
        key: String,
        #[command(flatten)]
        ctx: ContextArgs,
        /// Write the plaintext key (32 raw bytes, mode 0600) here instead of
        /// printing it.
        #[arg(long)]
        plaintext_file: Option<PathBuf>,
        /// Write the wrapped key (raw bytes) here.
        #[arg(long)]
        ciphertext_file: Option<PathBuf>,
    },
    /// Unwrap a data key.
    Decrypt {
        #[command(flatten)]
        input: CiphertextArgs,
        #[command(flatten)]
        ctx: ContextArgs,
        /// Write the plaintext key (raw, 0600) here instead of printing it.
        #[arg(long)]
        plaintext_file: Option<PathBuf>,
    },
    /// Rewrap a data key under the primary version.
    ReEncrypt {
        #[command(flatten)]
        input: CiphertextArgs,
        #[command(flatten)]
        ctx: ContextArgs,
        /// Write the new wrapped key (raw) here.
        #[arg(long)]
        ciphertext_out: Option<PathBuf>,
    },
}

/// Encryption context entries.
#[derive(Args, Debug)]
pub struct ContextArgs {
    /// Encryption context entry KEY=VALUE (repeatable).
    #[arg(long = "context", value_name = "KEY=VALUE")]
    pub context: Vec<String>,
}

/// Where a wrapped key comes from.
#[derive(Args, Debug)]
pub struct CiphertextArgs {
    /// The wrapped key, base64.
    #[arg(long, conflicts_with = "ciphertext_file")]
    pub ciphertext: Option<String>,
    /// File holding the wrapped key (raw bytes).
    #[arg(long)]
    pub ciphertext_file: Option<PathBuf>,
}

/// `tde key list | head -1`: when the reader of stdout goes away, end
/// quietly as Unix tools do. (Rust ignores SIGPIPE, so the print macros
/// panic with EPIPE instead; this crate has no unsafe code to restore the
/// signal.)
fn quiet_on_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let p = info.payload();
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("");
        // EPIPE is 32 on Linux; the text of the error may be translated.
        if msg.starts_with("failed printing to stdout") && msg.contains("(os error 32)") {
            std::process::exit(0);
        }
        default(info)
    }));
}

/// The global options each command uses (by the first word after `tde`;
/// `--json` goes with every one): the others are hidden from its help and
/// its manual page. They are still accepted (and completed: the shells'
/// completion scripts offer hidden options too), and ignored.
fn globals_used(sub: &str) -> &'static [&'static str] {
    match sub {
        "status" => &["config", "data_dir", "admin_socket", "data_socket"],
        "unseal" => &["config", "data_dir", "admin_socket"],
        "init" => &["config", "data_dir", "operator", "password_file"],
        "serve" | "policy" => &["config", "data_dir"],
        "mount" | "rewrap" => &["config", "data_dir", "data_socket"],
        "datakey" | "encrypt" | "decrypt" => &[
            "config",
            "data_dir",
            "admin_socket",
            "data_socket",
            "operator",
            "password_file",
        ],
        "pkcs11" => &[
            "config",
            "data_dir",
            "data_socket",
            "operator",
            "password_file",
        ],
        "inspect" | "umount" | "rekey" | "demo" | "completions" | "man" => &[],
        // The operators' commands over the admin socket.
        _ => &[
            "config",
            "data_dir",
            "admin_socket",
            "operator",
            "password_file",
        ],
    }
}

/// Gives `cmd` and every command under it a hidden, local copy of each
/// of `hidden` (clap then does not propagate the global one there: it
/// propagates only options a command lacks).
fn hide_globals(mut cmd: clap::Command, hidden: &[clap::Arg]) -> clap::Command {
    for a in hidden {
        cmd = cmd.arg(a.clone());
    }
    let subs: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in subs {
        cmd = cmd.mut_subcommand(name, |s| hide_globals(s, hidden));
    }
    cmd
}

/// The command line: clap's definition with each command's unused global
/// options hidden. Help, completions and manual pages come from it.
pub fn command() -> clap::Command {
    use clap::CommandFactory as _;
    let mut cmd = Cli::command();
    let globals: Vec<clap::Arg> = cmd
        .get_arguments()
        .filter(|a| a.is_global_set())
        .cloned()
        .collect();
    let names: Vec<String> = cmd
        .get_subcommands()
        .map(|s| s.get_name().to_string())
        .collect();
    for name in names {
        let used = globals_used(&name);
        let hidden: Vec<clap::Arg> = globals
            .iter()
            .filter(|g| g.get_id() != "json" && !used.contains(&g.get_id().as_str()))
            .map(|g| g.clone().global(false).hide(true))
            .collect();
        cmd = cmd.mut_subcommand(name, |s| hide_globals(s, &hidden));
    }
    cmd
}

fn main() -> ExitCode {
    use clap::FromArgMatches as _;
    quiet_on_broken_pipe();
    let cli = match Cli::from_arg_matches(&command().get_matches()) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    match cmd::run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
