//! Objects made, changed and used in the token: `C_GenerateKey`,
//! `C_GenerateKeyPair`, `C_CreateObject`, `C_DestroyObject`,
//! `C_SetAttributeValue`, `C_WrapKey`, `C_UnwrapKey`, and signatures
//! (`C_Sign*`, `C_Verify*`). The sidecar's HSM does the work and decides
//! what is allowed; the module checks what it can first, so that the
//! common mistakes get their return value without a round trip.

use super::*;

/// A `CKR_*` name at the head of a `PKCS11` refusal, as its value.
pub(super) fn rv_named(e: &ClientError) -> Rv {
    let ClientError::Refused { message, .. } = e else {
        return CKR_FUNCTION_FAILED;
    };
    let name = message.split(':').next().unwrap_or_default();
    NAMES
        .iter()
        .find(|(n, _)| *n == name)
        .map_or(CKR_FUNCTION_FAILED, |(_, rv)| *rv)
}

/// A return value's name, for people (`tde pkcs11`).
pub fn rv_name(rv: Rv) -> String {
    const MORE: &[(&str, Rv)] = &[
        ("CKR_PIN_INCORRECT", CKR_PIN_INCORRECT),
        ("CKR_PIN_LOCKED", CKR_PIN_LOCKED),
        ("CKR_DEVICE_ERROR", CKR_DEVICE_ERROR),
        ("CKR_TOKEN_NOT_PRESENT", CKR_TOKEN_NOT_PRESENT),
        ("CKR_FUNCTION_REJECTED", CKR_FUNCTION_REJECTED),
        ("CKR_USER_NOT_LOGGED_IN", CKR_USER_NOT_LOGGED_IN),
        ("CKR_SESSION_READ_ONLY_EXISTS", CKR_SESSION_READ_ONLY_EXISTS),
        ("CKR_FUNCTION_FAILED", CKR_FUNCTION_FAILED),
        ("CKR_GENERAL_ERROR", CKR_GENERAL_ERROR),
    ];
    NAMES
        .iter()
        .chain(MORE)
        .find(|(_, v)| *v == rv)
        .map_or_else(|| format!("{rv:#x}"), |(n, _)| n.to_string())
}

/// The `CKR_*` a `PKCS11` refusal may name.
const NAMES: &[(&str, Rv)] = &[
    ("CKR_ATTRIBUTE_READ_ONLY", CKR_ATTRIBUTE_READ_ONLY),
    ("CKR_ATTRIBUTE_TYPE_INVALID", CKR_ATTRIBUTE_TYPE_INVALID),
    ("CKR_ATTRIBUTE_VALUE_INVALID", CKR_ATTRIBUTE_VALUE_INVALID),
    ("CKR_DATA_INVALID", CKR_DATA_INVALID),
    ("CKR_DATA_LEN_RANGE", CKR_DATA_LEN_RANGE),
    ("CKR_ENCRYPTED_DATA_INVALID", CKR_ENCRYPTED_DATA_INVALID),
    ("CKR_ENCRYPTED_DATA_LEN_RANGE", CKR_ENCRYPTED_DATA_LEN_RANGE),
    (
        "CKR_KEY_FUNCTION_NOT_PERMITTED",
        CKR_KEY_FUNCTION_NOT_PERMITTED,
    ),
    ("CKR_KEY_HANDLE_INVALID", CKR_KEY_HANDLE_INVALID),
    ("CKR_KEY_NOT_WRAPPABLE", CKR_KEY_NOT_WRAPPABLE),
    ("CKR_KEY_SIZE_RANGE", CKR_KEY_SIZE_RANGE),
    ("CKR_KEY_TYPE_INCONSISTENT", CKR_KEY_TYPE_INCONSISTENT),
    ("CKR_KEY_UNEXTRACTABLE", CKR_KEY_UNEXTRACTABLE),
    ("CKR_MECHANISM_INVALID", CKR_MECHANISM_INVALID),
    ("CKR_MECHANISM_PARAM_INVALID", CKR_MECHANISM_PARAM_INVALID),
    ("CKR_OBJECT_HANDLE_INVALID", CKR_OBJECT_HANDLE_INVALID),
    ("CKR_ACTION_PROHIBITED", CKR_ACTION_PROHIBITED),
    ("CKR_SIGNATURE_INVALID", CKR_SIGNATURE_INVALID),
    ("CKR_SIGNATURE_LEN_RANGE", CKR_SIGNATURE_LEN_RANGE),
    ("CKR_TEMPLATE_INCOMPLETE", CKR_TEMPLATE_INCOMPLETE),
    ("CKR_TEMPLATE_INCONSISTENT", CKR_TEMPLATE_INCONSISTENT),
    (
        "CKR_UNWRAPPING_KEY_HANDLE_INVALID",
        CKR_UNWRAPPING_KEY_HANDLE_INVALID,
    ),
    (
        "CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT",
        CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT,
    ),
    ("CKR_WRAPPED_KEY_INVALID", CKR_WRAPPED_KEY_INVALID),
    ("CKR_WRAPPED_KEY_LEN_RANGE", CKR_WRAPPED_KEY_LEN_RANGE),
    (
        "CKR_WRAPPING_KEY_TYPE_INCONSISTENT",
        CKR_WRAPPING_KEY_TYPE_INCONSISTENT,
    ),
    ("CKR_DEVICE_MEMORY", CKR_DEVICE_MEMORY),
];

/// A signature or verification in progress: the hash-and-sign
/// mechanisms hash here, as the data comes, and send the hash; the others
/// send the data.
pub(super) struct SignOp {
    verify: bool,
    key: u64,
    mechanism: Mechanism,
    hasher: Option<Hasher>,
    data: zeroize::Zeroizing<Vec<u8>>,
    /// The signature's length.
    len: usize,
}

/// The hash a hash-and-sign mechanism computes first.
fn prehash(m: CK_MECHANISM_TYPE) -> Option<CK_MECHANISM_TYPE> {
    match m {
        CKM_SHA256_RSA_PKCS | CKM_SHA256_RSA_PKCS_PSS | CKM_ECDSA_SHA256 => Some(CKM_SHA256),
        CKM_SHA384_RSA_PKCS | CKM_SHA384_RSA_PKCS_PSS | CKM_ECDSA_SHA384 => Some(CKM_SHA384),
        CKM_SHA512_RSA_PKCS | CKM_SHA512_RSA_PKCS_PSS | CKM_ECDSA_SHA512 => Some(CKM_SHA512),
        _ => None,
    }
}

/// DER of the named curves' OIDs (RFC 5480), as `CKA_EC_PARAMS` holds
/// them, and each's signature length (`r | s`).
const CURVES: &[(&[u8], usize)] = &[
    (
        &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07],
        64,
    ),
    (&[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22], 96),
];

/// A session's slot and login, for an operation that needs a crypto user.
fn user_slot(h: CK_SESSION_HANDLE) -> Result<(usize, Arc<Slot>, bool), Rv> {
    let (index, slot, rw) = with_state(|s| {
        let x = s.sessions.get(&h).ok_or(CKR_SESSION_HANDLE_INVALID)?;
        Ok((
            x.slot,
            s.slots[x.slot].clone(),
            x.flags & CKF_RW_SESSION != 0,
        ))
    })?;
    if slot.user_type() != Some(CKU_USER) {
        return Err(CKR_USER_NOT_LOGGED_IN);
    }
    Ok((index, slot, rw))
}

/// `C_SignInit` / `C_VerifyInit`.
pub fn sign_init(
    h: CK_SESSION_HANDLE,
    verify: bool,
    mechanism: Mechanism,
    key: CK_OBJECT_HANDLE,
) -> Result<(), Rv> {
    let object = key_object(h, key)?;
    let (class, usage) = if verify {
        (CKO_PUBLIC_KEY, CKA_VERIFY)
    } else {
        (CKO_PRIVATE_KEY, CKA_SIGN)
    };
    let Source::Token(id) = object.source else {
        return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
    };
    if object.ulong(CKA_CLASS) != Some(class) || !object.flag(usage) {
        return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
    }
    let m = mechanism.kind();
    let rsa = matches!(
        m,
        CKM_RSA_PKCS
            | CKM_SHA256_RSA_PKCS
            | CKM_SHA384_RSA_PKCS
            | CKM_SHA512_RSA_PKCS
            | CKM_RSA_PKCS_PSS
            | CKM_SHA256_RSA_PKCS_PSS
            | CKM_SHA384_RSA_PKCS_PSS
            | CKM_SHA512_RSA_PKCS_PSS
    );
    let ecdsa = matches!(
        m,
        CKM_ECDSA | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384 | CKM_ECDSA_SHA512
    );
    let len = match object.ulong(CKA_KEY_TYPE) {
        Some(CKK_RSA) if rsa => object
            .attribute(CKA_MODULUS)
            .ok()
            .flatten()
            .map_or(0, <[u8]>::len),
        Some(CKK_EC) if ecdsa => {
            let params = object.attribute(CKA_EC_PARAMS).ok().flatten();
            CURVES
                .iter()
                .find(|(oid, _)| Some(*oid) == params)
                .map_or(0, |(_, n)| *n)
        }
        _ if rsa || ecdsa => return Err(CKR_KEY_TYPE_INCONSISTENT),
        _ => return Err(CKR_MECHANISM_INVALID),
    };
    user_slot(h)?;
    let hasher = prehash(m).map(Hasher::new).transpose()?;
    with_session(h, |x| {
        if x.sign.is_some() {
            return Err(CKR_OPERATION_ACTIVE);
        }
        x.sign = Some(SignOp {
            verify,
            key: id,
            mechanism,
            hasher,
            data: zeroize::Zeroizing::new(Vec::new()),
            len,
        });
        Ok(())
    })
}

/// `C_SignUpdate` / `C_VerifyUpdate`.
pub fn sign_update(h: CK_SESSION_HANDLE, verify: bool, part: &[u8]) -> Result<(), Rv> {
    with_session(h, |x| {
        let op = x
            .sign
            .as_mut()
            .filter(|o| o.verify == verify)
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        match op.hasher.as_mut() {
            Some(hasher) => hasher.update(part),
            None => {
                // The raw mechanisms sign a hash or a DigestInfo: short.
                if op.data.len() + part.len() > 1024 {
                    return Err(CKR_DATA_LEN_RANGE);
                }
                op.data.extend_from_slice(part);
            }
        }
        Ok(())
    })
}

/// Ends a signature or verification.
pub fn sign_abort(h: CK_SESSION_HANDLE) {
    let _ = with_session(h, |x| {
        x.sign = None;
        Ok(())
    });
}

/// What a signature or verification sends, once the last part is in.
struct SignInput {
    key: u64,
    mechanism: Mechanism,
    /// The data, or for hash-and-sign its hash.
    input: zeroize::Zeroizing<Vec<u8>>,
    /// The signature's length.
    len: usize,
}

impl SignInput {
    /// The call's key, mechanism, parameter and input.
    fn fill(&self, call: &mut P11Call) {
        call.key = P11Key::Object(self.key);
        call.mechanism = self.mechanism.kind();
        call.param = self.mechanism.param();
        call.data = SecretBytes::from_slice(&self.input);
    }
}

fn sign_input(h: CK_SESSION_HANDLE, verify: bool, last: &[u8]) -> Result<SignInput, Rv> {
    with_session(h, |x| {
        let op = x
            .sign
            .as_ref()
            .filter(|o| o.verify == verify)
            .ok_or(CKR_OPERATION_NOT_INITIALIZED)?;
        let input = match &op.hasher {
            Some(hasher) => {
                let mut hasher = hasher.clone();
                hasher.update(last);
                zeroize::Zeroizing::new(hasher.finish())
            }
            None => {
                if op.data.len() + last.len() > 1024 {
                    return Err(CKR_DATA_LEN_RANGE);
                }
                let mut d = op.data.clone();
                d.extend_from_slice(last);
                d
            }
        };
        Ok(SignInput {
            key: op.key,
            mechanism: op.mechanism.clone(),
            input,
            len: op.len,
        })
    })
}

/// `C_Sign` (`last`: the data) and `C_SignFinal` (`last` empty): the
/// signature, or the length to make room for.
pub fn sign_final(
    h: CK_SESSION_HANDLE,
    last: &[u8],
    out: Out,
) -> Result<Result<Vec<u8>, usize>, Rv> {
    let input = sign_input(h, false, last)?;
    let len = input.len;
    match out {
        Out::Length => return Ok(Err(len)),
        Out::Buffer(n) if n < len => return Ok(Err(len)),
        Out::Buffer(_) => {}
    }
    let slot = session_slot(h)?;
    let r = slot.call(
        |c, call| c.p11_data(Op::P11Sign, call),
        |call| input.fill(call),
    );
    sign_abort(h);
    let sig = r?.expose().to_vec();
    if sig.len() != len {
        return Err(CKR_DEVICE_ERROR);
    }
    Ok(Ok(sig))
}

/// `C_Verify` (`last`: the data) and `C_VerifyFinal`: `CKR_OK` or
/// `CKR_SIGNATURE_INVALID` (`CKR_SIGNATURE_LEN_RANGE` for a wrong
/// length). The operation ends either way.
pub fn verify_final(h: CK_SESSION_HANDLE, last: &[u8], signature: &[u8]) -> Result<(), Rv> {
    let input = sign_input(h, true, last)?;
    if signature.len() != input.len {
        sign_abort(h);
        return Err(CKR_SIGNATURE_LEN_RANGE);
    }
    let slot = session_slot(h)?;
    let r = slot.call(
        |c, call| c.p11_done(Op::P11Verify, call),
        |call| {
            input.fill(call);
            call.signature = signature.to_vec();
        },
    );
    sign_abort(h);
    r
}

/// A template's `CKA_TOKEN`.
fn is_token(template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)]) -> bool {
    template
        .iter()
        .any(|(t, v)| *t == CKA_TOKEN && v.as_slice() == [1])
}

/// Installs objects the sidecar made: a session object is this session's.
fn install_made(
    h: CK_SESSION_HANDLE,
    index: usize,
    made: &[P11ObjectInfo],
) -> Result<Vec<CK_OBJECT_HANDLE>, Rv> {
    with_state(|s| {
        Ok(made
            .iter()
            .map(|o| {
                let object = Object::token(index, o, None);
                let session = (!object.flag(CKA_TOKEN)).then_some(h);
                s.install(Object { session, ..object })
            })
            .collect())
    })
}

/// Checks a template for a new object: token objects need a read-write
/// session; no key value ever comes in the clear.
fn check_new(rw: bool, templates: &[&[(CK_ATTRIBUTE_TYPE, Vec<u8>)]]) -> Result<(), Rv> {
    for t in templates {
        if is_token(t) && !rw {
            return Err(CKR_SESSION_READ_ONLY);
        }
    }
    Ok(())
}

/// `C_GenerateKey` (`CKM_AES_KEY_GEN`).
pub fn generate_key(
    h: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_TYPE,
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, Rv> {
    if mechanism != CKM_AES_KEY_GEN {
        return Err(CKR_MECHANISM_INVALID);
    }
    if template.iter().any(|(t, _)| *t == CKA_VALUE) {
        return Err(CKR_ATTRIBUTE_READ_ONLY);
    }
    let (index, slot, rw) = user_slot(h)?;
    check_new(rw, &[template])?;
    let made = slot.call(
        |c, call| c.p11_make(Op::P11Generate, call),
        |call| {
            call.mechanism = mechanism;
            call.template = template.to_vec();
        },
    )?;
    install_made(h, index, &made)?
        .first()
        .copied()
        .ok_or(CKR_DEVICE_ERROR)
}

/// `C_GenerateKeyPair` (`CKM_RSA_PKCS_KEY_PAIR_GEN`,
/// `CKM_EC_KEY_PAIR_GEN`): `(public, private)`.
pub fn generate_key_pair(
    h: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_TYPE,
    public: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
    private: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<(CK_OBJECT_HANDLE, CK_OBJECT_HANDLE), Rv> {
    if !matches!(mechanism, CKM_RSA_PKCS_KEY_PAIR_GEN | CKM_EC_KEY_PAIR_GEN) {
        return Err(CKR_MECHANISM_INVALID);
    }
    let (index, slot, rw) = user_slot(h)?;
    check_new(rw, &[public, private])?;
    let made = slot.call(
        |c, call| c.p11_make(Op::P11Generate, call),
        |call| {
            call.mechanism = mechanism;
            call.template = private.to_vec();
            call.public_template = public.to_vec();
        },
    )?;
    match install_made(h, index, &made)?.as_slice() {
        [public, private] => Ok((*public, *private)),
        _ => Err(CKR_DEVICE_ERROR),
    }
}

/// `C_CreateObject`: certificates and data objects. A key's value never
/// comes in the clear: keys are generated or unwrapped in the token.
pub fn create_object(
    h: CK_SESSION_HANDLE,
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, Rv> {
    let class = template
        .iter()
        .find(|(t, _)| *t == CKA_CLASS)
        .and_then(|(_, v)| v.as_slice().try_into().ok())
        .map(CK_ULONG::from_ne_bytes)
        .ok_or(CKR_TEMPLATE_INCOMPLETE)?;
    if !matches!(class, CKO_CERTIFICATE | CKO_DATA) {
        return Err(CKR_TEMPLATE_INCONSISTENT);
    }
    let (index, slot, rw) = user_slot(h)?;
    check_new(rw, &[template])?;
    let made = slot.call(
        |c, call| c.p11_make(Op::P11Create, call),
        |call| call.template = template.to_vec(),
    )?;
    install_made(h, index, &made)?
        .first()
        .copied()
        .ok_or(CKR_DEVICE_ERROR)
}

/// The token object behind a handle, for a change: master keys are
/// managed with `tde key`, never here.
fn changeable(h: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE) -> Result<(u64, Arc<Slot>), Rv> {
    let object = object(h, handle)?;
    let Source::Token(id) = object.source else {
        return Err(CKR_ACTION_PROHIBITED);
    };
    let slot = session_slot(h)?;
    let rw = with_state(|s| {
        Ok(s.sessions
            .get(&h)
            .is_some_and(|x| x.flags & CKF_RW_SESSION != 0))
    })?;
    if object.flag(CKA_TOKEN) && !rw {
        return Err(CKR_SESSION_READ_ONLY);
    }
    Ok((id, slot))
}

/// `C_DestroyObject`.
pub fn destroy_object(h: CK_SESSION_HANDLE, handle: CK_OBJECT_HANDLE) -> Result<(), Rv> {
    let (id, slot) = changeable(h, handle)?;
    let r = slot.call(
        |c, call| c.p11_done(Op::P11Destroy, call),
        |call| call.key = P11Key::Object(id),
    );
    if matches!(r, Ok(()) | Err(CKR_OBJECT_HANDLE_INVALID)) {
        with_state(|s| {
            s.forget(handle);
            Ok(())
        })?;
    }
    r
}

/// `C_SetAttributeValue`: `CKA_LABEL` and `CKA_ID`.
pub fn set_attributes(
    h: CK_SESSION_HANDLE,
    handle: CK_OBJECT_HANDLE,
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<(), Rv> {
    let (id, slot) = changeable(h, handle)?;
    let made = slot.call(
        |c, call| c.p11_make(Op::P11SetAttributes, call),
        |call| {
            call.key = P11Key::Object(id);
            call.template = template.to_vec();
        },
    )?;
    let index = with_state(|s| Ok(s.objects.get(&handle).map_or(0, |o| o.slot)))?;
    install_made(h, index, &made).map(|_| ())
}

/// `C_WrapKey`: `key` wrapped under `wrapping` (AES key wrap), or the
/// length to make room for.
pub fn wrap_key(
    h: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_TYPE,
    wrapping: CK_OBJECT_HANDLE,
    key: CK_OBJECT_HANDLE,
    out: Out,
) -> Result<Result<Vec<u8>, usize>, Rv> {
    if !matches!(
        mechanism,
        CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD | CKM_AES_KEY_WRAP_KWP
    ) {
        return Err(CKR_MECHANISM_INVALID);
    }
    let kek = object(h, wrapping).map_err(|_| CKR_WRAPPING_KEY_HANDLE_INVALID)?;
    let target = key_object(h, key)?;
    let (Source::Token(kek), Source::Token(target_id)) = (kek.source, target.source.clone()) else {
        return Err(CKR_KEY_UNEXTRACTABLE);
    };
    if !target.flag(CKA_EXTRACTABLE) {
        return Err(CKR_KEY_UNEXTRACTABLE);
    }
    // AES keys of 16 or 32 bytes: both wraps add 8 bytes.
    let need = target.ulong(CKA_VALUE_LEN).ok_or(CKR_KEY_NOT_WRAPPABLE)? as usize + 8;
    match out {
        Out::Length => return Ok(Err(need)),
        Out::Buffer(n) if n < need => return Ok(Err(need)),
        Out::Buffer(_) => {}
    }
    let (_, slot, _) = user_slot(h)?;
    let wrapped = slot.call(
        |c, call| c.p11_data(Op::P11Wrap, call),
        |call| {
            call.key = P11Key::Object(kek);
            call.target = target_id;
            call.mechanism = mechanism;
        },
    )?;
    Ok(Ok(wrapped.expose().to_vec()))
}

/// `C_UnwrapKey`: a wrapped AES key becomes an object of the token.
pub fn unwrap_key(
    h: CK_SESSION_HANDLE,
    mechanism: CK_MECHANISM_TYPE,
    unwrapping: CK_OBJECT_HANDLE,
    wrapped: &[u8],
    template: &[(CK_ATTRIBUTE_TYPE, Vec<u8>)],
) -> Result<CK_OBJECT_HANDLE, Rv> {
    if !matches!(
        mechanism,
        CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD | CKM_AES_KEY_WRAP_KWP
    ) {
        return Err(CKR_MECHANISM_INVALID);
    }
    let kek = object(h, unwrapping).map_err(|_| CKR_UNWRAPPING_KEY_HANDLE_INVALID)?;
    let Source::Token(kek) = kek.source else {
        return Err(CKR_KEY_FUNCTION_NOT_PERMITTED);
    };
    if wrapped.len() > tde_protocol::message::MAX_P11_DATA {
        return Err(CKR_WRAPPED_KEY_LEN_RANGE);
    }
    let (index, slot, rw) = user_slot(h)?;
    check_new(rw, &[template])?;
    let made = slot.call(
        |c, call| c.p11_make(Op::P11Unwrap, call),
        |call| {
            call.key = P11Key::Object(kek);
            call.mechanism = mechanism;
            call.data = SecretBytes::from_slice(wrapped);
            call.template = template.to_vec();
        },
    )?;
    install_made(h, index, &made)?
        .first()
        .copied()
        .ok_or(CKR_DEVICE_ERROR)
}
