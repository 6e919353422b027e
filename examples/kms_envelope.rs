//! A KMS-style client of the tde sidecar: envelope encryption of a file,
//! the way an application uses AWS KMS's `GenerateDataKey`.
//!
//! ```sh
//! cargo run --example kms_envelope -- encrypt --socket /run/tde/data.sock --key app-files report.pdf
//! #   -> report.pdf.enc (nonce || AES-256-GCM-SIV ciphertext)
//! #      report.pdf.key (JSON: the master key, its version, the context and the wrapped data key)
//! cargo run --example kms_envelope -- decrypt --socket /run/tde/data.sock report.pdf.enc
//! #   -> report.pdf
//! ```
//!
//! 1. Ask the sidecar for a data key (`generate_data_key`) under a master
//!    key, bound to an encryption context (here: the file's name). The
//!    answer holds the key twice: in clear, and wrapped by the master key.
//! 2. Encrypt the file locally with the clear key; forget it.
//! 3. Store the wrapped key next to the file. Only the sidecar can unwrap
//!    it (`decrypt`), for a caller its policy allows, with the same context.
//!
//! The whole file is read into memory: for large files use `tde encrypt`,
//! which streams (docs/OPERATIONS.md, "Encrypting files").
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use aes_gcm_siv::aead::{Aead, KeyInit, Payload};
use aes_gcm_siv::{Aes256GcmSiv, Nonce};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::json;
use tde_protocol::client::Client;

/// Bound into the ciphertext: a `.enc` of this example, version 1.
const AAD: &[u8] = b"tde kms_envelope example v1";

fn main() -> ExitCode {
    match run(std::env::args().skip(1).collect()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kms_envelope: {e}");
            ExitCode::FAILURE
        }
    }
}

fn usage() -> String {
    "usage: kms_envelope encrypt --socket SOCKET --key KEY FILE\n       kms_envelope decrypt --socket SOCKET FILE.enc".into()
}

fn run(args: Vec<String>) -> Result<(), String> {
    let (mut socket, mut key, mut file) = (None, None, None);
    let mut it = args.iter().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--socket" => socket = it.next().map(PathBuf::from),
            "--key" => key = it.next().cloned(),
            f => file = Some(PathBuf::from(f)),
        }
    }
    let (socket, file) = (socket.ok_or_else(usage)?, file.ok_or_else(usage)?);
    let mut client = Client::connect(&socket).map_err(|e| e.to_string())?;
    match args.first().map(String::as_str) {
        Some("encrypt") => encrypt(&mut client, &key.ok_or_else(usage)?, &file),
        Some("decrypt") => decrypt(&mut client, &file),
        _ => Err(usage()),
    }
}

/// The encryption context: the file's name, so that a `.key` copied next
/// to another file does not unwrap for it.
fn context(file: &Path) -> BTreeMap<String, String> {
    let name = file
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    BTreeMap::from([("file".to_string(), name)])
}

fn with_suffix(file: &Path, suffix: &str) -> PathBuf {
    let mut s = file.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

fn encrypt(client: &mut Client, key: &str, file: &Path) -> Result<(), String> {
    let plain = std::fs::read(file).map_err(|e| format!("reading {}: {e}", file.display()))?;
    let context = context(file);
    // 1. A fresh data key, in clear and wrapped.
    let dk = client
        .generate_data_key(key, &context)
        .map_err(|e| e.to_string())?;
    // 2. Encrypted here, with a random nonce (RFC 8452: AES-256-GCM-SIV).
    let cipher = Aes256GcmSiv::new_from_slice(dk.plaintext.expose())
        .map_err(|_| "the data key is not 32 bytes".to_string())?;
    let mut nonce = [0u8; 12];
    getrandom::fill(&mut nonce).map_err(|e| e.to_string())?;
    let sealed = cipher
        .encrypt(
            &Nonce::from(nonce),
            Payload {
                msg: &plain,
                aad: AAD,
            },
        )
        .map_err(|_| "encryption failed".to_string())?;
    // The clear key is scrubbed when `dk` drops, here.
    drop((cipher, dk.plaintext));
    let enc = with_suffix(file, ".enc");
    std::fs::write(&enc, [&nonce[..], &sealed].concat())
        .map_err(|e| format!("writing {}: {e}", enc.display()))?;
    // 3. Only the wrapped key is kept.
    let meta = json!({
        "key": dk.key, "key_version": dk.version, "context": context,
        "wrapped_key": B64.encode(&dk.ciphertext),
    });
    let key_file = with_suffix(file, ".key");
    std::fs::write(&key_file, meta.to_string() + "\n")
        .map_err(|e| format!("writing {}: {e}", key_file.display()))?;
    println!(
        "{} -> {} and {} (data key under {} version {})",
        file.display(),
        enc.display(),
        key_file.display(),
        dk.key,
        dk.version
    );
    Ok(())
}

fn decrypt(client: &mut Client, enc: &Path) -> Result<(), String> {
    let file = enc
        .to_str()
        .and_then(|s| s.strip_suffix(".enc"))
        .map(PathBuf::from)
        .ok_or("the file to decrypt must end in .enc")?;
    let key_file = with_suffix(&file, ".key");
    let meta: serde_json::Value = std::fs::read(&key_file)
        .map_err(|e| format!("reading {}: {e}", key_file.display()))
        .and_then(|b| {
            serde_json::from_slice(&b).map_err(|e| format!("{}: {e}", key_file.display()))
        })?;
    let wrapped = meta["wrapped_key"]
        .as_str()
        .and_then(|s| B64.decode(s).ok())
        .ok_or("no wrapped_key in the key file")?;
    // The sidecar unwraps it for a caller its policy allows, with the
    // context it was made with.
    let dk = client
        .decrypt(&wrapped, &context(&file))
        .map_err(|e| e.to_string())?;
    let cipher = Aes256GcmSiv::new_from_slice(dk.plaintext.expose())
        .map_err(|_| "the data key is not 32 bytes".to_string())?;
    let blob = std::fs::read(enc).map_err(|e| format!("reading {}: {e}", enc.display()))?;
    if blob.len() < 12 + 16 {
        return Err(format!("{} is too short", enc.display()));
    }
    let (nonce, sealed) = blob.split_at(12);
    let nonce = Nonce::try_from(nonce).map_err(|_| "bad nonce".to_string())?;
    let plain = cipher
        .decrypt(
            &nonce,
            Payload {
                msg: sealed,
                aad: AAD,
            },
        )
        .map_err(|_| {
            format!(
                "{} fails authentication (changed, or not this key's)",
                enc.display()
            )
        })?;
    if file.exists() {
        return Err(format!("{} exists; not overwritten", file.display()));
    }
    std::fs::write(&file, plain).map_err(|e| format!("writing {}: {e}", file.display()))?;
    println!("{} -> {}", enc.display(), file.display());
    Ok(())
}
