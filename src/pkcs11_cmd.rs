//! `tde pkcs11 list`: the PKCS#11 tokens the module sees and, after a login,
//! their objects, through the module's own code (`tde_pkcs11::module`), so
//! what it shows is what an application loading `libtde_pkcs11.so` gets.

use anyhow::{Context, bail};
use cryptoki_sys::*;
use serde_json::{Value, json};
use tde_pkcs11::config::{Config, SlotConfig};
use tde_pkcs11::module::{self, Object};

use tde_sidecar::Config as TdeConfig;

use crate::cmd::emit;
use crate::{Cli, Pkcs11Cmd};

/// `CKR_*` as text for an error message.
fn rv(r: CK_RV) -> anyhow::Error {
    anyhow::anyhow!(
        "the PKCS#11 module answered {}",
        tde_pkcs11::module::rv_name(r)
    )
}

fn text(o: &Object, t: CK_ATTRIBUTE_TYPE) -> String {
    o.attribute(t)
        .ok()
        .flatten()
        .map(|v| String::from_utf8_lossy(v).into_owned())
        .unwrap_or_default()
}

fn hex(o: &Object, t: CK_ATTRIBUTE_TYPE) -> String {
    o.attribute(t)
        .ok()
        .flatten()
        .map(|v| v.iter().map(|b| format!("{b:02x}")).collect())
        .unwrap_or_default()
}

fn ulong(o: &Object, t: CK_ATTRIBUTE_TYPE) -> Option<CK_ULONG> {
    let v = o.attribute(t).ok().flatten()?;
    Some(CK_ULONG::from_ne_bytes(v.try_into().ok()?))
}

fn flag(o: &Object, t: CK_ATTRIBUTE_TYPE) -> bool {
    o.attribute(t) == Ok(Some(&[1u8][..]))
}

/// One object as JSON.
fn object_json(o: &Object) -> Value {
    let class = match ulong(o, CKA_CLASS) {
        Some(CKO_SECRET_KEY) => "secret_key",
        Some(CKO_PRIVATE_KEY) => "private_key",
        Some(CKO_PUBLIC_KEY) => "public_key",
        Some(CKO_CERTIFICATE) => "certificate",
        Some(CKO_DATA) => "data",
        _ => "other",
    };
    let key_type = match ulong(o, CKA_KEY_TYPE) {
        Some(CKK_AES) => format!("AES-{}", ulong(o, CKA_VALUE_LEN).unwrap_or(0) * 8),
        Some(CKK_RSA) => format!(
            "RSA-{}",
            o.attribute(CKA_MODULUS)
                .ok()
                .flatten()
                .map_or(0, <[u8]>::len)
                * 8
        ),
        Some(CKK_EC) => match hex(o, CKA_EC_PARAMS).as_str() {
            "06082a8648ce3d030107" => "EC P-256".into(),
            "06052b81040022" => "EC P-384".into(),
            _ => "EC".into(),
        },
        _ => String::new(),
    };
    let uses: Vec<&str> = [
        (CKA_ENCRYPT, "encrypt"),
        (CKA_DECRYPT, "decrypt"),
        (CKA_SIGN, "sign"),
        (CKA_VERIFY, "verify"),
        (CKA_WRAP, "wrap"),
        (CKA_UNWRAP, "unwrap"),
    ]
    .into_iter()
    .filter(|(t, _)| flag(o, *t))
    .map(|(_, n)| n)
    .collect();
    json!({
        "class": class,
        "key_type": key_type,
        "label": text(o, CKA_LABEL),
        "id": hex(o, CKA_ID),
        "token": flag(o, CKA_TOKEN),
        "sensitive": flag(o, CKA_SENSITIVE),
        "extractable": flag(o, CKA_EXTRACTABLE),
        "uses": uses,
    })
}

/// The slots as the module would have them: the module's configuration
/// file if there is one, else this sidecar's data socket.
fn slots(data_socket: std::path::PathBuf) -> anyhow::Result<Config> {
    let named = std::env::var_os("TDE_PKCS11_CONFIG").is_some();
    if named || std::path::Path::new(tde_pkcs11::config::DEFAULT_PATH).exists() {
        return Config::load().map_err(|e| anyhow::anyhow!("PKCS#11 configuration: {e}"));
    }
    Ok(Config {
        slots: vec![SlotConfig {
            socket: std::env::var_os("TDE_PKCS11_SOCKET")
                .map_or(data_socket, std::path::PathBuf::from),
            label: None,
        }],
    })
}

/// `tde pkcs11 list`.
pub fn run(cli: &Cli, cfg: &TdeConfig, c: &Pkcs11Cmd) -> anyhow::Result<()> {
    let Pkcs11Cmd::List { user, no_login } = c;
    let config = slots(crate::cmd::data_path(cli, cfg))?;
    module::initialize_with(config).map_err(rv)?;
    let r = list(cli, cfg, *user, *no_login);
    let _ = module::finalize();
    let tokens = r?;
    emit(cli, json!(tokens), || {
        let mut out = Vec::new();
        for t in &tokens {
            out.push(format!(
                "slot {}: {} (token {:?}, serial {}) at {}",
                t["slot"],
                if t["present"] == true {
                    "present"
                } else {
                    "no answer"
                },
                t["label"].as_str().unwrap_or_default(),
                t["serial"].as_str().unwrap_or_default(),
                t["socket"].as_str().unwrap_or_default()
            ));
            for o in t["objects"].as_array().into_iter().flatten() {
                out.push(format!(
                    "  {:<12} {:<10} {:<7} id {:<34} {} [{}]",
                    o["class"].as_str().unwrap_or_default(),
                    o["key_type"].as_str().unwrap_or_default(),
                    if o["token"] == true {
                        "token"
                    } else {
                        "session"
                    },
                    o["id"].as_str().unwrap_or_default(),
                    o["label"].as_str().unwrap_or_default(),
                    o["uses"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|u| u.as_str())
                        .collect::<Vec<_>>()
                        .join(",")
                ));
            }
        }
        out.join("\n")
    });
    Ok(())
}

fn list(cli: &Cli, cfg: &TdeConfig, user: bool, no_login: bool) -> anyhow::Result<Vec<Value>> {
    let mut tokens = Vec::new();
    for slot in module::slot_list(false).map_err(rv)? {
        let info = module::slot_info(slot).map_err(rv)?;
        let socket = info
            .description
            .strip_prefix("tde sidecar at ")
            .unwrap_or(&info.description)
            .to_string();
        let Ok(token) = module::token_info(slot) else {
            tokens.push(json!({"slot": slot, "present": false, "socket": socket}));
            continue;
        };
        let mut objects = Vec::new();
        if !no_login {
            // Read-write: a security officer may not log in with a read-only
            // session open.
            let h = module::open_session(slot, CKF_SERIAL_SESSION | CKF_RW_SESSION).map_err(rv)?;
            let password = crate::cmd::password(cli, cfg)?;
            let pin = format!("{}:{}", cli.operator(), password.as_str());
            let who = if user { CKU_USER } else { CKU_SO };
            let r = module::login(h, who, pin.as_bytes());
            if let Err(r) = r {
                let _ = module::close_session(h);
                match r {
                    CKR_PIN_INCORRECT => bail!(
                        "login refused: wrong password, or operator {:?} is not a {} ({})",
                        cli.operator(),
                        if user {
                            "crypto user"
                        } else {
                            "crypto officer"
                        },
                        if user {
                            "drop --user"
                        } else {
                            "add --user for a crypto user"
                        }
                    ),
                    CKR_FUNCTION_REJECTED => bail!(
                        "this process's client policy does not allow pkcs11 (see `tde policy check`)"
                    ),
                    r => return Err(rv(r)).context("C_Login"),
                }
            }
            module::find_objects_init(h, &[]).map_err(rv)?;
            loop {
                let found = module::find_objects(h, 64).map_err(rv)?;
                if found.is_empty() {
                    break;
                }
                for handle in found {
                    objects.push(object_json(&module::object(h, handle).map_err(rv)?));
                }
            }
            module::find_objects_final(h).map_err(rv)?;
            let _ = module::logout(h);
            let _ = module::close_session(h);
        }
        tokens.push(json!({
            "slot": slot,
            "present": true,
            "socket": socket,
            "label": token.label,
            "serial": token.serial,
            "objects": objects,
        }));
    }
    Ok(tokens)
}
