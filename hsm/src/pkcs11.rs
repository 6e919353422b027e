//! PKCS#11 token objects: AES secret keys, RSA and EC key pairs,
//! certificates and data objects that a PKCS#11 application creates in
//! the HSM, and the mechanisms that use them.
//!
//! Each object is a list of attributes (type, value as the application
//! gave it; `CK_ULONG` values are 8 bytes in the host's byte order, as the
//! module passes them through) and, for a secret or private key, its
//! material, which never leaves the HSM except wrapped by another key
//! (`C_WrapKey`, only when the object is `CKA_EXTRACTABLE`). Nothing here is
//! invented: AES-GCM (NIST SP 800-38D), AES-CBC with PKCS#7 padding
//! (SP 800-38A, RFC 5652 section 6.3), AES key wrap (RFC 3394) and key wrap
//! with padding (RFC 5649), RSASSA-PKCS1-v1_5, RSASSA-PSS and RSAES-OAEP
//! (RFC 8017), ECDSA (FIPS 186-5), all from aws-lc.

use aws_lc_rs::digest;
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rsa::{KeySize, OaepPrivateDecryptingKey, PrivateDecryptingKey};
use aws_lc_rs::signature::{self, EcdsaKeyPair, KeyPair as _, RsaKeyPair};

use crate::codec::{Dec, Enc};
use crate::error::HsmError;
use crate::random;
use crate::secret::SecretBuf;

/// The PKCS#11 constants used here, with the values of the OASIS
/// PKCS#11 v3.0 header `pkcs11t.h`.
#[allow(missing_docs)]
pub mod ck {
    pub const CKO_DATA: u64 = 0;
    pub const CKO_CERTIFICATE: u64 = 1;
    pub const CKO_PUBLIC_KEY: u64 = 2;
    pub const CKO_PRIVATE_KEY: u64 = 3;
    pub const CKO_SECRET_KEY: u64 = 4;

    pub const CKK_RSA: u64 = 0;
    pub const CKK_EC: u64 = 3;
    pub const CKK_AES: u64 = 0x1f;
    pub const CKC_X_509: u64 = 0;

    pub const CKA_CLASS: u64 = 0x0;
    pub const CKA_TOKEN: u64 = 0x1;
    pub const CKA_PRIVATE: u64 = 0x2;
    pub const CKA_LABEL: u64 = 0x3;
    pub const CKA_APPLICATION: u64 = 0x10;
    pub const CKA_VALUE: u64 = 0x11;
    pub const CKA_OBJECT_ID: u64 = 0x12;
    pub const CKA_CERTIFICATE_TYPE: u64 = 0x80;
    pub const CKA_ISSUER: u64 = 0x81;
    pub const CKA_SERIAL_NUMBER: u64 = 0x82;
    pub const CKA_TRUSTED: u64 = 0x86;
    pub const CKA_CERTIFICATE_CATEGORY: u64 = 0x87;
    pub const CKA_KEY_TYPE: u64 = 0x100;
    pub const CKA_SUBJECT: u64 = 0x101;
    pub const CKA_ID: u64 = 0x102;
    pub const CKA_SENSITIVE: u64 = 0x103;
    pub const CKA_ENCRYPT: u64 = 0x104;
    pub const CKA_DECRYPT: u64 = 0x105;
    pub const CKA_WRAP: u64 = 0x106;
    pub const CKA_UNWRAP: u64 = 0x107;
    pub const CKA_SIGN: u64 = 0x108;
    pub const CKA_SIGN_RECOVER: u64 = 0x109;
    pub const CKA_VERIFY: u64 = 0x10a;
    pub const CKA_VERIFY_RECOVER: u64 = 0x10b;
    pub const CKA_DERIVE: u64 = 0x10c;
    pub const CKA_START_DATE: u64 = 0x110;
    pub const CKA_END_DATE: u64 = 0x111;
    pub const CKA_MODULUS: u64 = 0x120;
    pub const CKA_MODULUS_BITS: u64 = 0x121;
    pub const CKA_PUBLIC_EXPONENT: u64 = 0x122;
    pub const CKA_PUBLIC_KEY_INFO: u64 = 0x129;
    pub const CKA_VALUE_LEN: u64 = 0x161;
    pub const CKA_EXTRACTABLE: u64 = 0x162;
    pub const CKA_LOCAL: u64 = 0x163;
    pub const CKA_NEVER_EXTRACTABLE: u64 = 0x164;
    pub const CKA_ALWAYS_SENSITIVE: u64 = 0x165;
    pub const CKA_KEY_GEN_MECHANISM: u64 = 0x166;
    pub const CKA_MODIFIABLE: u64 = 0x170;
    pub const CKA_COPYABLE: u64 = 0x171;
    pub const CKA_DESTROYABLE: u64 = 0x172;
    pub const CKA_EC_PARAMS: u64 = 0x180;
    pub const CKA_EC_POINT: u64 = 0x181;
    pub const CKA_ALWAYS_AUTHENTICATE: u64 = 0x202;
    pub const CKA_WRAP_WITH_TRUSTED: u64 = 0x210;

    pub const CKM_RSA_PKCS_KEY_PAIR_GEN: u64 = 0x0;
    pub const CKM_RSA_PKCS: u64 = 0x1;
    pub const CKM_RSA_PKCS_OAEP: u64 = 0x9;
    pub const CKM_RSA_PKCS_PSS: u64 = 0xd;
    pub const CKM_SHA256_RSA_PKCS: u64 = 0x40;
    pub const CKM_SHA384_RSA_PKCS: u64 = 0x41;
    pub const CKM_SHA512_RSA_PKCS: u64 = 0x42;
    pub const CKM_SHA256_RSA_PKCS_PSS: u64 = 0x43;
    pub const CKM_SHA384_RSA_PKCS_PSS: u64 = 0x44;
    pub const CKM_SHA512_RSA_PKCS_PSS: u64 = 0x45;
    pub const CKM_SHA_1: u64 = 0x220;
    pub const CKM_SHA256: u64 = 0x250;
    pub const CKM_SHA384: u64 = 0x260;
    pub const CKM_SHA512: u64 = 0x270;
    pub const CKM_EC_KEY_PAIR_GEN: u64 = 0x1040;
    pub const CKM_ECDSA: u64 = 0x1041;
    pub const CKM_ECDSA_SHA256: u64 = 0x1044;
    pub const CKM_ECDSA_SHA384: u64 = 0x1045;
    pub const CKM_ECDSA_SHA512: u64 = 0x1046;
    pub const CKM_AES_KEY_GEN: u64 = 0x1080;
    pub const CKM_AES_CBC_PAD: u64 = 0x1085;
    pub const CKM_AES_GCM: u64 = 0x1087;
    pub const CKM_AES_KEY_WRAP: u64 = 0x2109;
    pub const CKM_AES_KEY_WRAP_PAD: u64 = 0x210a;
    pub const CKM_AES_KEY_WRAP_KWP: u64 = 0x210b;

    pub const CKG_MGF1_SHA1: u64 = 1;
    pub const CKG_MGF1_SHA256: u64 = 2;
    pub const CKG_MGF1_SHA384: u64 = 3;
    pub const CKG_MGF1_SHA512: u64 = 4;
}

use ck::*;

/// Why a PKCS#11 request was refused: the return value the module gives
/// the application (its name leads the error message on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[allow(missing_docs, non_camel_case_types, clippy::upper_case_acronyms)]
pub enum Ckr {
    CKR_ATTRIBUTE_READ_ONLY,
    CKR_ATTRIBUTE_TYPE_INVALID,
    CKR_ATTRIBUTE_VALUE_INVALID,
    CKR_DATA_INVALID,
    CKR_DATA_LEN_RANGE,
    CKR_ENCRYPTED_DATA_INVALID,
    CKR_ENCRYPTED_DATA_LEN_RANGE,
    CKR_KEY_FUNCTION_NOT_PERMITTED,
    CKR_KEY_HANDLE_INVALID,
    CKR_KEY_NOT_WRAPPABLE,
    CKR_KEY_SIZE_RANGE,
    CKR_KEY_TYPE_INCONSISTENT,
    CKR_KEY_UNEXTRACTABLE,
    CKR_MECHANISM_INVALID,
    CKR_MECHANISM_PARAM_INVALID,
    CKR_OBJECT_HANDLE_INVALID,
    CKR_ACTION_PROHIBITED,
    CKR_SIGNATURE_INVALID,
    CKR_SIGNATURE_LEN_RANGE,
    CKR_TEMPLATE_INCOMPLETE,
    CKR_TEMPLATE_INCONSISTENT,
    CKR_UNWRAPPING_KEY_HANDLE_INVALID,
    CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT,
    CKR_WRAPPED_KEY_INVALID,
    CKR_WRAPPED_KEY_LEN_RANGE,
    CKR_WRAPPING_KEY_TYPE_INCONSISTENT,
    CKR_DEVICE_MEMORY,
}

impl Ckr {
    /// The name, as in the PKCS#11 header.
    pub fn name(self) -> String {
        format!("{self:?}")
    }
}

fn refuse<T>(rv: Ckr, why: &str) -> Result<T, HsmError> {
    Err(HsmError::Pkcs11(rv, why.to_string()))
}

/// Attributes: (type, value) in the order given.
pub type Attrs = Vec<(u64, Vec<u8>)>;

/// Most attributes in one template or object.
pub const MAX_ATTRS: usize = 64;
/// Longest attribute value (a certificate's DER fits).
pub const MAX_ATTR_LEN: usize = 16 * 1024;
/// Most objects the HSM keeps for one operator (token and session).
pub const MAX_OBJECTS: usize = 4096;

/// An object as the application may see it: its id and its public
/// attributes. A key's secret attributes (`CKA_VALUE`, the RSA private
/// components) are not in the list; the module answers
/// `CKR_ATTRIBUTE_SENSITIVE` for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct P11Object {
    /// Stable id (the module's handle is its own).
    pub id: u64,
    /// Public attributes.
    pub attrs: Attrs,
}

/// A key's material in memory, parsed once.
pub(crate) enum Material {
    /// Certificates, data objects, public keys.
    None,
    /// AES, 16 or 32 bytes.
    Aes(SecretBuf),
    /// An RSA private key, and its PKCS#8 encoding (for the store).
    Rsa(Box<RsaKeyPair>, SecretBuf),
    /// An EC private key on P-256 or P-384, and its PKCS#8 encoding.
    Ec(Box<EcdsaKeyPair>, SecretBuf, Curve),
}

impl std::fmt::Debug for Material {
    /// The kind only: never key bytes.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Material::None => "Material::None",
            Material::Aes(_) => "Material::Aes([REDACTED])",
            Material::Rsa(..) => "Material::Rsa([REDACTED])",
            Material::Ec(..) => "Material::Ec([REDACTED])",
        })
    }
}

impl Material {
    fn stored(&self) -> Option<&[u8]> {
        match self {
            Material::None => None,
            Material::Aes(k) => Some(k.expose()),
            Material::Rsa(_, der) | Material::Ec(_, der, _) => Some(der.expose()),
        }
    }
}

/// The curves offered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Curve {
    P256,
    P384,
}

/// DER of the curves' object identifiers (RFC 5480 section 2.1.1.1), the
/// only `CKA_EC_PARAMS` accepted.
const P256_OID: &[u8] = &[0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
const P384_OID: &[u8] = &[0x06, 0x05, 0x2b, 0x81, 0x04, 0x00, 0x22];

impl Curve {
    fn from_params(p: &[u8]) -> Result<Curve, HsmError> {
        match p {
            P256_OID => Ok(Curve::P256),
            P384_OID => Ok(Curve::P384),
            _ => refuse(
                Ckr::CKR_ATTRIBUTE_VALUE_INVALID,
                "CKA_EC_PARAMS: only the P-256 and P-384 named curves",
            ),
        }
    }
    fn oid(self) -> &'static [u8] {
        match self {
            Curve::P256 => P256_OID,
            Curve::P384 => P384_OID,
        }
    }
    fn signing(self) -> &'static signature::EcdsaSigningAlgorithm {
        match self {
            Curve::P256 => &signature::ECDSA_P256_SHA256_FIXED_SIGNING,
            Curve::P384 => &signature::ECDSA_P384_SHA384_FIXED_SIGNING,
        }
    }
    fn verifying(self) -> &'static signature::EcdsaVerificationAlgorithm {
        match self {
            Curve::P256 => &signature::ECDSA_P256_SHA256_FIXED,
            Curve::P384 => &signature::ECDSA_P384_SHA384_FIXED,
        }
    }
    /// The hash whose length is the curve order's: a CKM_ECDSA input is
    /// taken to this length (FIPS 186-5 section 6.4.1: the leftmost bits
    /// of a longer hash; a shorter one is the same integer left-padded).
    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Curve::P256 => &digest::SHA256,
            Curve::P384 => &digest::SHA384,
        }
    }
}

/// One object in the HSM.
pub(crate) struct Entry {
    pub(crate) owner: String,
    pub(crate) attrs: Attrs,
    pub(crate) material: Material,
}

fn get(attrs: &[(u64, Vec<u8>)], t: u64) -> Option<&[u8]> {
    attrs
        .iter()
        .find(|(a, _)| *a == t)
        .map(|(_, v)| v.as_slice())
}

fn ulong(attrs: &[(u64, Vec<u8>)], t: u64) -> Result<Option<u64>, HsmError> {
    match get(attrs, t) {
        None => Ok(None),
        Some(v) => match <[u8; 8]>::try_from(v) {
            Ok(b) => Ok(Some(u64::from_ne_bytes(b))),
            Err(_) => refuse(
                Ckr::CKR_ATTRIBUTE_VALUE_INVALID,
                "a CK_ULONG attribute is not 8 bytes",
            ),
        },
    }
}

fn flag(attrs: &[(u64, Vec<u8>)], t: u64) -> Result<Option<bool>, HsmError> {
    match get(attrs, t) {
        None => Ok(None),
        Some([b]) => Ok(Some(*b != 0)),
        Some(_) => refuse(
            Ckr::CKR_ATTRIBUTE_VALUE_INVALID,
            "a CK_BBOOL attribute is not 1 byte",
        ),
    }
}

fn ul(v: u64) -> Vec<u8> {
    v.to_ne_bytes().to_vec()
}

fn yes(b: bool) -> Vec<u8> {
    vec![u8::from(b)]
}

/// What a template may set, by class: everything else is
/// `CKR_ATTRIBUTE_TYPE_INVALID` (or read-only).
fn settable(class: u64, t: u64) -> bool {
    const COMMON: &[u64] = &[
        CKA_CLASS,
        CKA_TOKEN,
        CKA_PRIVATE,
        CKA_LABEL,
        CKA_MODIFIABLE,
        CKA_COPYABLE,
        CKA_DESTROYABLE,
    ];
    const KEY: &[u64] = &[
        CKA_KEY_TYPE,
        CKA_ID,
        CKA_START_DATE,
        CKA_END_DATE,
        CKA_DERIVE,
        CKA_SUBJECT,
    ];
    let by_class: &[u64] = match class {
        CKO_SECRET_KEY => &[
            CKA_SENSITIVE,
            CKA_EXTRACTABLE,
            CKA_ENCRYPT,
            CKA_DECRYPT,
            CKA_WRAP,
            CKA_UNWRAP,
            CKA_SIGN,
            CKA_VERIFY,
            CKA_VALUE_LEN,
            CKA_TRUSTED,
            CKA_WRAP_WITH_TRUSTED,
        ],
        CKO_PRIVATE_KEY => &[
            CKA_SENSITIVE,
            CKA_EXTRACTABLE,
            CKA_DECRYPT,
            CKA_SIGN,
            CKA_SIGN_RECOVER,
            CKA_UNWRAP,
            CKA_ALWAYS_AUTHENTICATE,
            CKA_WRAP_WITH_TRUSTED,
        ],
        CKO_PUBLIC_KEY => &[
            CKA_ENCRYPT,
            CKA_VERIFY,
            CKA_VERIFY_RECOVER,
            CKA_WRAP,
            CKA_TRUSTED,
            CKA_MODULUS_BITS,
            CKA_PUBLIC_EXPONENT,
            CKA_EC_PARAMS,
        ],
        CKO_CERTIFICATE => &[
            CKA_CERTIFICATE_TYPE,
            CKA_VALUE,
            CKA_SUBJECT,
            CKA_ID,
            CKA_ISSUER,
            CKA_SERIAL_NUMBER,
            CKA_TRUSTED,
            CKA_CERTIFICATE_CATEGORY,
            CKA_START_DATE,
            CKA_END_DATE,
        ],
        CKO_DATA => &[CKA_VALUE, CKA_APPLICATION, CKA_OBJECT_ID],
        _ => &[],
    };
    COMMON.contains(&t) || by_class.contains(&t) || (class != CKO_DATA && KEY.contains(&t))
}

/// Checks a template's shape and that it asks nothing the class forbids.
fn check_template(class: u64, t: &[(u64, Vec<u8>)]) -> Result<(), HsmError> {
    if t.len() > MAX_ATTRS {
        return refuse(Ckr::CKR_TEMPLATE_INCONSISTENT, "too many attributes");
    }
    for (i, (a, v)) in t.iter().enumerate() {
        if v.len() > MAX_ATTR_LEN {
            return refuse(Ckr::CKR_ATTRIBUTE_VALUE_INVALID, "an attribute over 16 KiB");
        }
        if t[..i].iter().any(|(b, _)| b == a) {
            return refuse(Ckr::CKR_TEMPLATE_INCONSISTENT, "an attribute given twice");
        }
        // A key's value is made in the token or unwrapped into it: never
        // taken from a template.
        let key_value = *a == CKA_VALUE && matches!(class, CKO_SECRET_KEY | CKO_PRIVATE_KEY);
        if key_value
            || matches!(
                *a,
                CKA_LOCAL | CKA_NEVER_EXTRACTABLE | CKA_ALWAYS_SENSITIVE | CKA_KEY_GEN_MECHANISM
            )
        {
            return refuse(
                Ckr::CKR_ATTRIBUTE_READ_ONLY,
                "the token sets this attribute",
            );
        }
        if !settable(class, *a) {
            return refuse(
                Ckr::CKR_ATTRIBUTE_TYPE_INVALID,
                "an attribute this class of object does not take",
            );
        }
    }
    if flag(t, CKA_SENSITIVE)? == Some(false) {
        return refuse(
            Ckr::CKR_ATTRIBUTE_VALUE_INVALID,
            "CKA_SENSITIVE: every secret and private key in tde is sensitive",
        );
    }
    if flag(t, CKA_TRUSTED)? == Some(true) {
        return refuse(
            Ckr::CKR_ATTRIBUTE_READ_ONLY,
            "CKA_TRUSTED: only a security officer may set it, and tde does not",
        );
    }
    if flag(t, CKA_COPYABLE)? == Some(true) {
        return refuse(
            Ckr::CKR_ATTRIBUTE_VALUE_INVALID,
            "CKA_COPYABLE: no C_CopyObject",
        );
    }
    for a in [CKA_MODIFIABLE, CKA_DESTROYABLE] {
        if flag(t, a)? == Some(false) {
            return refuse(
                Ckr::CKR_ATTRIBUTE_VALUE_INVALID,
                "objects stay modifiable and destroyable",
            );
        }
    }
    if let Some(c) = ulong(t, CKA_CLASS)?
        && c != class
    {
        return refuse(Ckr::CKR_TEMPLATE_INCONSISTENT, "CKA_CLASS");
    }
    Ok(())
}

/// The attributes every stored object has, then the template's own
/// choices over the defaults, then what the token computed.
fn build(
    class: u64,
    template: &[(u64, Vec<u8>)],
    defaults: &[(u64, Vec<u8>)],
    computed: Attrs,
) -> Result<Attrs, HsmError> {
    let mut out: Attrs = vec![
        (CKA_CLASS, ul(class)),
        (CKA_TOKEN, yes(flag(template, CKA_TOKEN)?.unwrap_or(false))),
        // Everything is seen only after a login; see PKCS11.md.
        (CKA_PRIVATE, yes(true)),
        (CKA_LABEL, Vec::new()),
        (CKA_MODIFIABLE, yes(true)),
        (CKA_COPYABLE, yes(false)),
        (CKA_DESTROYABLE, yes(true)),
    ];
    if class != CKO_DATA {
        out.push((CKA_ID, Vec::new()));
    }
    let mut set = |t: u64, v: Vec<u8>| match out.iter_mut().find(|(a, _)| *a == t) {
        Some(slot) => slot.1 = v,
        None => out.push((t, v)),
    };
    for (t, v) in defaults {
        set(*t, v.clone());
    }
    for (t, v) in template {
        if !matches!(*t, CKA_PRIVATE | CKA_CLASS) {
            set(*t, v.clone());
        }
    }
    for (t, v) in computed {
        set(t, v);
    }
    Ok(out)
}

fn key_defaults(key_type: u64, mechanism: Option<u64>) -> Attrs {
    vec![
        (CKA_KEY_TYPE, ul(key_type)),
        (CKA_START_DATE, Vec::new()),
        (CKA_END_DATE, Vec::new()),
        (CKA_DERIVE, yes(false)),
        (CKA_LOCAL, yes(mechanism.is_some())),
        (
            CKA_KEY_GEN_MECHANISM,
            ul(mechanism.unwrap_or(u64::MAX)), // CK_UNAVAILABLE_INFORMATION
        ),
    ]
}

/// The usage flags of a secret or private key (a private or secret key is
/// always sensitive; extractable only when asked, and then never
/// "never extractable").
fn secret_flags(
    t: &[(u64, Vec<u8>)],
    uses: &[(u64, bool)],
    local: bool,
) -> Result<Attrs, HsmError> {
    let extractable = flag(t, CKA_EXTRACTABLE)?.unwrap_or(false);
    let mut out = vec![
        (CKA_SENSITIVE, yes(true)),
        (CKA_ALWAYS_SENSITIVE, yes(local)),
        (CKA_EXTRACTABLE, yes(extractable)),
        (CKA_NEVER_EXTRACTABLE, yes(local && !extractable)),
        (CKA_WRAP_WITH_TRUSTED, yes(false)),
    ];
    for (a, default) in uses {
        out.push((*a, yes(flag(t, *a)?.unwrap_or(*default))));
    }
    Ok(out)
}

fn aes_len(n: usize) -> Result<(), HsmError> {
    if n == 16 || n == 32 {
        Ok(())
    } else {
        refuse(
            Ckr::CKR_KEY_SIZE_RANGE,
            "AES keys are 16 or 32 bytes (AES-128, AES-256)",
        )
    }
}

/// A new AES key (`CKM_AES_KEY_GEN`, or `material` from `C_UnwrapKey` or
/// `C_CreateObject`).
pub(crate) fn secret_key(
    template: &[(u64, Vec<u8>)],
    material: Option<SecretBuf>,
    mechanism: Option<u64>,
) -> Result<(Attrs, Material), HsmError> {
    check_template(CKO_SECRET_KEY, template)?;
    if let Some(k) = ulong(template, CKA_KEY_TYPE)?
        && k != CKK_AES
    {
        return refuse(Ckr::CKR_TEMPLATE_INCONSISTENT, "only AES secret keys");
    }
    let len = ulong(template, CKA_VALUE_LEN)?;
    let key = match material {
        Some(m) => {
            if len.is_some_and(|l| l != m.expose().len() as u64) {
                return refuse(Ckr::CKR_TEMPLATE_INCONSISTENT, "CKA_VALUE_LEN");
            }
            m
        }
        None => {
            let n = usize::try_from(len.unwrap_or(32)).unwrap_or(0);
            aes_len(n)?;
            SecretBuf::new(random::bytes(n)?)
        }
    };
    aes_len(key.expose().len())?;
    let local = mechanism == Some(CKM_AES_KEY_GEN);
    let mut computed = secret_flags(
        template,
        &[
            (CKA_ENCRYPT, true),
            (CKA_DECRYPT, true),
            (CKA_WRAP, true),
            (CKA_UNWRAP, true),
            (CKA_SIGN, false),
            (CKA_VERIFY, false),
        ],
        local,
    )?;
    computed.push((CKA_VALUE_LEN, ul(key.expose().len() as u64)));
    let attrs = build(
        CKO_SECRET_KEY,
        template,
        &key_defaults(CKK_AES, mechanism.filter(|_| local)),
        computed,
    )?;
    if flag(template, CKA_SIGN)? == Some(true) || flag(template, CKA_VERIFY)? == Some(true) {
        return refuse(
            Ckr::CKR_TEMPLATE_INCONSISTENT,
            "no MAC mechanisms: CKA_SIGN",
        );
    }
    Ok((attrs, Material::Aes(key)))
}

/// A certificate or data object (`C_CreateObject`). Certificates must be
/// X.509 and have a value; tde keeps their attributes as given and does
/// not parse them.
pub(crate) fn plain_object(class: u64, template: &[(u64, Vec<u8>)]) -> Result<Attrs, HsmError> {
    check_template(class, template)?;
    let mut defaults = vec![(CKA_VALUE, Vec::new())];
    if class == CKO_CERTIFICATE {
        if ulong(template, CKA_CERTIFICATE_TYPE)? != Some(CKC_X_509) {
            return refuse(Ckr::CKR_TEMPLATE_INCOMPLETE, "CKA_CERTIFICATE_TYPE: X.509");
        }
        if get(template, CKA_VALUE).is_none_or(<[u8]>::is_empty) {
            return refuse(
                Ckr::CKR_TEMPLATE_INCOMPLETE,
                "a certificate needs CKA_VALUE",
            );
        }
        defaults.extend([
            (CKA_SUBJECT, Vec::new()),
            (CKA_ISSUER, Vec::new()),
            (CKA_SERIAL_NUMBER, Vec::new()),
            (CKA_TRUSTED, yes(false)),
            (CKA_CERTIFICATE_CATEGORY, ul(0)),
            (CKA_START_DATE, Vec::new()),
            (CKA_END_DATE, Vec::new()),
        ]);
    } else {
        defaults.extend([(CKA_APPLICATION, Vec::new()), (CKA_OBJECT_ID, Vec::new())]);
    }
    build(class, template, &defaults, Vec::new())
}

/// The big-endian integer without its leading zeros.
fn unsigned(b: &[u8]) -> Vec<u8> {
    let start = b
        .iter()
        .position(|&x| x != 0)
        .unwrap_or(b.len().saturating_sub(1));
    b[start..].to_vec()
}

/// A DER OCTET STRING around `v` (`CKA_EC_POINT`, X9.62 section 4.3.6).
fn octet_string(v: &[u8]) -> Vec<u8> {
    let mut out = vec![0x04];
    if v.len() < 0x80 {
        out.push(v.len() as u8);
    } else {
        out.extend([0x81, v.len() as u8]);
    }
    out.extend_from_slice(v);
    out
}

/// A key pair: `(public attributes, private attributes, material)`.
pub(crate) fn key_pair(
    mechanism: u64,
    public: &[(u64, Vec<u8>)],
    private: &[(u64, Vec<u8>)],
) -> Result<(Attrs, Attrs, Material), HsmError> {
    check_template(CKO_PUBLIC_KEY, public)?;
    check_template(CKO_PRIVATE_KEY, private)?;
    let (key_type, material, shared, pub_only) = match mechanism {
        CKM_RSA_PKCS_KEY_PAIR_GEN => {
            let bits = ulong(public, CKA_MODULUS_BITS)?.ok_or_else(|| {
                HsmError::Pkcs11(Ckr::CKR_TEMPLATE_INCOMPLETE, "CKA_MODULUS_BITS".into())
            })?;
            let size = match bits {
                2048 => KeySize::Rsa2048,
                3072 => KeySize::Rsa3072,
                4096 => KeySize::Rsa4096,
                _ => {
                    return refuse(
                        Ckr::CKR_KEY_SIZE_RANGE,
                        "RSA keys are 2048, 3072 or 4096 bits",
                    );
                }
            };
            if let Some(e) = get(public, CKA_PUBLIC_EXPONENT)
                && unsigned(e) != [1, 0, 1]
            {
                return refuse(
                    Ckr::CKR_ATTRIBUTE_VALUE_INVALID,
                    "CKA_PUBLIC_EXPONENT: 65537 only",
                );
            }
            let kp = RsaKeyPair::generate(size)
                .map_err(|_| HsmError::Internal("RSA key generation failed"))?;
            let der = kp
                .as_der()
                .map_err(|_| HsmError::Internal("RSA key encoding failed"))?;
            let der = SecretBuf::new(der.as_ref().to_vec());
            let (shared, pub_only) = rsa_public_attrs(&kp)?;
            (CKK_RSA, Material::Rsa(Box::new(kp), der), shared, pub_only)
        }
        CKM_EC_KEY_PAIR_GEN => {
            let params = get(public, CKA_EC_PARAMS).ok_or_else(|| {
                HsmError::Pkcs11(Ckr::CKR_TEMPLATE_INCOMPLETE, "CKA_EC_PARAMS".into())
            })?;
            let curve = Curve::from_params(params)?;
            let doc = EcdsaKeyPair::generate_pkcs8(
                curve.signing(),
                &aws_lc_rs::rand::SystemRandom::new(),
            )
            .map_err(|_| HsmError::Internal("EC key generation failed"))?;
            let der = SecretBuf::new(doc.as_ref().to_vec());
            let kp = EcdsaKeyPair::from_pkcs8(curve.signing(), der.expose())
                .map_err(|_| HsmError::Internal("EC key parsing failed"))?;
            let (shared, pub_only) = ec_public_attrs(&kp, curve)?;
            (
                CKK_EC,
                Material::Ec(Box::new(kp), der, curve),
                shared,
                pub_only,
            )
        }
        _ => return refuse(Ckr::CKR_MECHANISM_INVALID, "not a key-pair mechanism"),
    };
    let rsa = key_type == CKK_RSA;
    let defaults = key_defaults(key_type, Some(mechanism));
    let mut pub_computed = vec![
        (CKA_ENCRYPT, yes(flag(public, CKA_ENCRYPT)?.unwrap_or(rsa))),
        (CKA_VERIFY, yes(flag(public, CKA_VERIFY)?.unwrap_or(true))),
        (CKA_VERIFY_RECOVER, yes(false)),
        (CKA_WRAP, yes(false)),
        (CKA_TRUSTED, yes(false)),
        (
            CKA_SUBJECT,
            get(public, CKA_SUBJECT).unwrap_or_default().to_vec(),
        ),
    ];
    pub_computed.extend(shared.iter().cloned());
    pub_computed.extend(pub_only);
    if !rsa && flag(public, CKA_ENCRYPT)? == Some(true) {
        return refuse(Ckr::CKR_TEMPLATE_INCONSISTENT, "EC keys do not encrypt");
    }
    for t in [CKA_VERIFY_RECOVER, CKA_WRAP] {
        if flag(public, t)? == Some(true) {
            return refuse(
                Ckr::CKR_TEMPLATE_INCONSISTENT,
                "no verify-recover or RSA wrapping",
            );
        }
    }
    let mut priv_computed = secret_flags(private, &[(CKA_DECRYPT, rsa), (CKA_SIGN, true)], true)?;
    if !rsa && flag(private, CKA_DECRYPT)? == Some(true) {
        return refuse(Ckr::CKR_TEMPLATE_INCONSISTENT, "EC keys do not decrypt");
    }
    for t in [CKA_SIGN_RECOVER, CKA_UNWRAP, CKA_ALWAYS_AUTHENTICATE] {
        if flag(private, t)? == Some(true) {
            return refuse(
                Ckr::CKR_TEMPLATE_INCONSISTENT,
                "no sign-recover, RSA unwrapping or per-use authentication",
            );
        }
    }
    priv_computed.extend([
        (CKA_SIGN_RECOVER, yes(false)),
        (CKA_UNWRAP, yes(false)),
        (CKA_ALWAYS_AUTHENTICATE, yes(false)),
        (
            CKA_SUBJECT,
            get(private, CKA_SUBJECT).unwrap_or_default().to_vec(),
        ),
    ]);
    priv_computed.extend(shared);
    let pub_attrs = build(CKO_PUBLIC_KEY, public, &defaults, pub_computed)?;
    let priv_attrs = build(CKO_PRIVATE_KEY, private, &defaults, priv_computed)?;
    Ok((pub_attrs, priv_attrs, material))
}

/// `(attributes both halves show, the public key's own)`.
fn rsa_public_attrs(kp: &RsaKeyPair) -> Result<(Attrs, Attrs), HsmError> {
    let pk = kp.public_key();
    let spki = pk
        .as_der()
        .map_err(|_| HsmError::Internal("RSA public key encoding failed"))?;
    let (n, e) =
        rsa_components(pk.as_ref()).ok_or(HsmError::Internal("RSA public key encoding failed"))?;
    let bits = (kp.public_modulus_len() * 8) as u64;
    Ok((
        vec![
            (CKA_MODULUS, n),
            (CKA_PUBLIC_EXPONENT, e),
            (CKA_PUBLIC_KEY_INFO, spki.as_ref().to_vec()),
        ],
        vec![(CKA_MODULUS_BITS, ul(bits))],
    ))
}

fn ec_public_attrs(kp: &EcdsaKeyPair, curve: Curve) -> Result<(Attrs, Attrs), HsmError> {
    let pk = kp.public_key();
    let spki = pk
        .as_der()
        .map_err(|_| HsmError::Internal("EC public key encoding failed"))?;
    Ok((
        vec![
            (CKA_EC_PARAMS, curve.oid().to_vec()),
            (CKA_PUBLIC_KEY_INFO, spki.as_ref().to_vec()),
        ],
        vec![(CKA_EC_POINT, octet_string(pk.as_ref()))],
    ))
}

/// The modulus and exponent of a DER `RSAPublicKey` (RFC 8017 appendix
/// A.1.1: a SEQUENCE of two INTEGERs), without leading zeros.
fn rsa_components(der: &[u8]) -> Option<(Vec<u8>, Vec<u8>)> {
    fn tlv(b: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&t, rest) = b.split_first()?;
        if t != tag {
            return None;
        }
        let (&l, rest) = rest.split_first()?;
        let (len, rest) = if l < 0x80 {
            (usize::from(l), rest)
        } else {
            let n = usize::from(l & 0x7f);
            if n == 0 || n > 2 || rest.len() < n {
                return None;
            }
            let len = rest[..n]
                .iter()
                .fold(0usize, |a, &x| (a << 8) | usize::from(x));
            (len, &rest[n..])
        };
        (rest.len() >= len).then(|| rest.split_at(len))
    }
    let (seq, _) = tlv(der, 0x30)?;
    let (n, rest) = tlv(seq, 0x02)?;
    let (e, _) = tlv(rest, 0x02)?;
    Some((unsigned(n), unsigned(e)))
}

/// Rebuilds the parsed material from a stored record's bytes.
pub(crate) fn material(
    attrs: &[(u64, Vec<u8>)],
    stored: Option<SecretBuf>,
) -> Result<Material, HsmError> {
    let class = ulong(attrs, CKA_CLASS)?;
    let key_type = ulong(attrs, CKA_KEY_TYPE)?;
    let bad = || HsmError::InvalidCiphertext("PKCS#11 object record");
    Ok(match (class, key_type, stored) {
        (Some(CKO_SECRET_KEY), Some(CKK_AES), Some(k)) => {
            aes_len(k.expose().len()).map_err(|_| bad())?;
            Material::Aes(k)
        }
        (Some(CKO_PRIVATE_KEY), Some(CKK_RSA), Some(der)) => {
            let kp = RsaKeyPair::from_pkcs8(der.expose()).map_err(|_| bad())?;
            Material::Rsa(Box::new(kp), der)
        }
        (Some(CKO_PRIVATE_KEY), Some(CKK_EC), Some(der)) => {
            let curve = Curve::from_params(get(attrs, CKA_EC_PARAMS).unwrap_or_default())
                .map_err(|_| bad())?;
            let kp = EcdsaKeyPair::from_pkcs8(curve.signing(), der.expose()).map_err(|_| bad())?;
            Material::Ec(Box::new(kp), der, curve)
        }
        (Some(CKO_DATA | CKO_CERTIFICATE | CKO_PUBLIC_KEY), _, None) => Material::None,
        _ => return Err(bad()),
    })
}

/// The record sealed in the store:
/// `u8 format (1) | var owner | u16 n | n x (u64 type | var value) |
/// u8 has_material | [var material]`.
pub(crate) fn encode(e: &Entry) -> SecretBuf {
    encode_parts(&e.owner, &e.attrs, &e.material)
}

/// [`encode`] from the parts.
pub(crate) fn encode_parts(
    owner: &str,
    attrs: &[(u64, Vec<u8>)],
    material: &Material,
) -> SecretBuf {
    // Room for everything up front: a growing buffer would leave copies
    // of the material behind in freed memory.
    let size = 16
        + owner.len()
        + attrs.iter().map(|(_, v)| 10 + v.len()).sum::<usize>()
        + material.stored().map_or(0, |m| 2 + m.len());
    let mut enc = Enc::with_capacity(size);
    enc.u8(1).var(owner.as_bytes()).u16(attrs.len() as u16);
    for (t, v) in attrs {
        enc.u64(*t).var(v);
    }
    match material.stored() {
        Some(m) => {
            enc.u8(1).var(m);
        }
        None => {
            enc.u8(0);
        }
    }
    SecretBuf::new(enc.0)
}

/// Reads a record back.
pub(crate) fn decode(b: &[u8]) -> Result<Entry, HsmError> {
    let mut d = Dec::new(b, "PKCS#11 object record");
    if d.u8()? != 1 {
        return Err(HsmError::InvalidCiphertext("PKCS#11 object record format"));
    }
    let owner = d.string()?;
    let n = d.u16()?;
    if usize::from(n) > MAX_ATTRS * 2 {
        return Err(HsmError::InvalidCiphertext("PKCS#11 object record"));
    }
    let mut attrs = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let t = d.u64()?;
        attrs.push((t, d.var()?.to_vec()));
    }
    let stored = match d.u8()? {
        0 => None,
        _ => Some(SecretBuf::new(d.var()?.to_vec())),
    };
    d.finish()?;
    let material = material(&attrs, stored)?;
    Ok(Entry {
        owner,
        attrs,
        material,
    })
}

impl Entry {
    pub(crate) fn is_token(&self) -> bool {
        flag(&self.attrs, CKA_TOKEN).ok().flatten().unwrap_or(false)
    }

    pub(crate) fn label(&self) -> String {
        String::from_utf8_lossy(get(&self.attrs, CKA_LABEL).unwrap_or_default()).into_owned()
    }

    fn allows(&self, usage: u64) -> Result<(), HsmError> {
        if flag(&self.attrs, usage)? == Some(true) {
            Ok(())
        } else {
            refuse(
                Ckr::CKR_KEY_FUNCTION_NOT_PERMITTED,
                "the key's attributes do not allow this use",
            )
        }
    }

    /// `C_SetAttributeValue`: the attributes with `template` applied;
    /// only `CKA_LABEL` and `CKA_ID` change.
    pub(crate) fn with_set(&self, template: &[(u64, Vec<u8>)]) -> Result<Attrs, HsmError> {
        if template.len() > MAX_ATTRS {
            return refuse(Ckr::CKR_TEMPLATE_INCONSISTENT, "too many attributes");
        }
        for (t, v) in template {
            if v.len() > MAX_ATTR_LEN {
                return refuse(Ckr::CKR_ATTRIBUTE_VALUE_INVALID, "an attribute over 16 KiB");
            }
            let known = self.attrs.iter().any(|(a, _)| a == t);
            if !matches!(*t, CKA_LABEL | CKA_ID) || !known {
                return refuse(
                    if known {
                        Ckr::CKR_ATTRIBUTE_READ_ONLY
                    } else {
                        Ckr::CKR_ATTRIBUTE_TYPE_INVALID
                    },
                    "only CKA_LABEL and CKA_ID can be changed",
                );
            }
        }
        let mut attrs = self.attrs.clone();
        for (t, v) in template {
            if let Some(slot) = attrs.iter_mut().find(|(a, _)| a == t) {
                slot.1 = v.clone();
            }
        }
        Ok(attrs)
    }

    /// The AES key, for `usage`.
    fn aes(&self, usage: u64) -> Result<&[u8], HsmError> {
        self.allows(usage)?;
        match &self.material {
            Material::Aes(k) => Ok(k.expose()),
            _ => refuse(Ckr::CKR_KEY_TYPE_INCONSISTENT, "not an AES key"),
        }
    }

    /// `C_Encrypt` / `C_Decrypt`.
    pub(crate) fn crypt(
        &self,
        encrypt: bool,
        mechanism: u64,
        param: &[u8],
        aad: &[u8],
        data: &[u8],
    ) -> Result<SecretBuf, HsmError> {
        let usage = if encrypt { CKA_ENCRYPT } else { CKA_DECRYPT };
        match mechanism {
            CKM_AES_GCM => {
                let key = self.aes(usage)?;
                let iv: [u8; 12] = param.try_into().map_err(|_| {
                    HsmError::Pkcs11(Ckr::CKR_MECHANISM_PARAM_INVALID, "a 12-byte GCM IV".into())
                })?;
                aes_gcm(key, encrypt, &iv, aad, data)
            }
            CKM_AES_CBC_PAD => {
                let key = self.aes(usage)?;
                let iv: [u8; 16] = param.try_into().map_err(|_| {
                    HsmError::Pkcs11(Ckr::CKR_MECHANISM_PARAM_INVALID, "a 16-byte CBC IV".into())
                })?;
                aes_cbc_pad(key, encrypt, iv, data)
            }
            CKM_RSA_PKCS_OAEP => {
                self.allows(usage)?;
                let alg = oaep(param)?;
                let label = (!aad.is_empty()).then_some(aad);
                if encrypt {
                    let spki = get(&self.attrs, CKA_PUBLIC_KEY_INFO).unwrap_or_default();
                    let pk = aws_lc_rs::rsa::PublicEncryptingKey::from_der(spki)
                        .ok()
                        .and_then(|k| aws_lc_rs::rsa::OaepPublicEncryptingKey::new(k).ok())
                        .ok_or_else(|| {
                            HsmError::Pkcs11(
                                Ckr::CKR_KEY_TYPE_INCONSISTENT,
                                "not an RSA public key".into(),
                            )
                        })?;
                    if data.len() > pk.max_plaintext_size(alg) {
                        return refuse(Ckr::CKR_DATA_LEN_RANGE, "too long for OAEP with this key");
                    }
                    let mut out = vec![0u8; pk.ciphertext_size()];
                    let n = pk
                        .encrypt(alg, data, &mut out, label)
                        .map_err(|_| HsmError::Internal("OAEP encryption failed"))?
                        .len();
                    out.truncate(n);
                    Ok(SecretBuf::new(out))
                } else {
                    let Material::Rsa(_, der) = &self.material else {
                        return refuse(Ckr::CKR_KEY_TYPE_INCONSISTENT, "not an RSA private key");
                    };
                    let k = PrivateDecryptingKey::from_pkcs8(der.expose())
                        .ok()
                        .and_then(|k| OaepPrivateDecryptingKey::new(k).ok())
                        .ok_or(HsmError::Internal("RSA key parsing failed"))?;
                    let mut out = vec![0u8; k.min_output_size()];
                    let n = k
                        .decrypt(alg, data, &mut out, label)
                        .map_err(|_| {
                            HsmError::Pkcs11(
                                Ckr::CKR_ENCRYPTED_DATA_INVALID,
                                "OAEP decryption failed".into(),
                            )
                        })?
                        .len();
                    out.truncate(n);
                    Ok(SecretBuf::new(out))
                }
            }
            _ => refuse(
                Ckr::CKR_MECHANISM_INVALID,
                "not an encryption mechanism tde offers",
            ),
        }
    }

    /// `C_Sign`: `data` is what the mechanism signs, or for a mechanism
    /// that hashes first, the hash the module computed.
    pub(crate) fn sign(
        &self,
        mechanism: u64,
        param: &[u8],
        data: &[u8],
    ) -> Result<Vec<u8>, HsmError> {
        self.allows(CKA_SIGN)?;
        match (&self.material, mechanism) {
            (Material::Rsa(_, der), CKM_RSA_PKCS) => {
                no_param(param)?;
                tde_raw_rsa::sign(der.expose(), data).ok_or_else(|| {
                    HsmError::Pkcs11(
                        Ckr::CKR_DATA_LEN_RANGE,
                        "CKM_RSA_PKCS signs at most the modulus length less 11 bytes".into(),
                    )
                })
            }
            (Material::Rsa(kp, _), _) => {
                let (scheme, hash) = rsa_scheme(mechanism, param, data)?;
                let d = scheme.digest(hash)?;
                let mut sig = vec![0u8; kp.public_modulus_len()];
                kp.sign_digest(scheme.signing(), &d, &mut sig)
                    .map_err(|_| HsmError::Internal("RSA signing failed"))?;
                Ok(sig)
            }
            (
                Material::Ec(kp, _, curve),
                CKM_ECDSA | CKM_ECDSA_SHA256 | CKM_ECDSA_SHA384 | CKM_ECDSA_SHA512,
            ) => {
                let d = ecdsa_input(*curve, mechanism, data)?;
                let sig = kp
                    .sign_digest(&d)
                    .map_err(|_| HsmError::Internal("ECDSA signing failed"))?;
                Ok(sig.as_ref().to_vec())
            }
            (Material::Ec(..), _) => refuse(Ckr::CKR_MECHANISM_INVALID, "EC keys sign with ECDSA"),
            _ => refuse(Ckr::CKR_KEY_TYPE_INCONSISTENT, "not a private key"),
        }
    }

    /// `C_Verify` with a public key.
    pub(crate) fn verify(
        &self,
        mechanism: u64,
        param: &[u8],
        data: &[u8],
        sig: &[u8],
    ) -> Result<(), HsmError> {
        self.allows(CKA_VERIFY)?;
        let key_type = ulong(&self.attrs, CKA_KEY_TYPE)?;
        let bad = || {
            HsmError::Pkcs11(
                Ckr::CKR_SIGNATURE_INVALID,
                "the signature does not verify".into(),
            )
        };
        match key_type {
            Some(CKK_RSA) => {
                let spki = get(&self.attrs, CKA_PUBLIC_KEY_INFO).unwrap_or_default();
                let modulus = get(&self.attrs, CKA_MODULUS).unwrap_or_default().len();
                if sig.len() != modulus {
                    return refuse(
                        Ckr::CKR_SIGNATURE_LEN_RANGE,
                        "an RSA signature is the modulus's length",
                    );
                }
                if mechanism == CKM_RSA_PKCS {
                    no_param(param)?;
                    return if tde_raw_rsa::verify(spki, data, sig) {
                        Ok(())
                    } else {
                        Err(bad())
                    };
                }
                let (scheme, hash) = rsa_scheme(mechanism, param, data)?;
                let d = scheme.digest(hash)?;
                signature::UnparsedPublicKey::new(scheme.verifying(), spki)
                    .verify_digest(&d, sig)
                    .map_err(|_| bad())
            }
            Some(CKK_EC) => {
                let curve =
                    Curve::from_params(get(&self.attrs, CKA_EC_PARAMS).unwrap_or_default())?;
                let point = get(&self.attrs, CKA_PUBLIC_KEY_INFO).unwrap_or_default();
                let d = ecdsa_input(curve, mechanism, data)?;
                if sig.len() != 2 * curve.digest().output_len() {
                    return refuse(Ckr::CKR_SIGNATURE_LEN_RANGE, "an ECDSA signature is r | s");
                }
                signature::UnparsedPublicKey::new(curve.verifying(), point)
                    .verify_digest(&d, sig)
                    .map_err(|_| bad())
            }
            _ => refuse(Ckr::CKR_KEY_TYPE_INCONSISTENT, "not a public key"),
        }
    }

    /// `C_WrapKey`: `target`'s AES key under this one (RFC 3394 / 5649).
    pub(crate) fn wrap(
        &self,
        mechanism: u64,
        param: &[u8],
        target: &Entry,
    ) -> Result<Vec<u8>, HsmError> {
        let kek = self.aes(CKA_WRAP).map_err(|e| match e {
            HsmError::Pkcs11(Ckr::CKR_KEY_TYPE_INCONSISTENT, m) => {
                HsmError::Pkcs11(Ckr::CKR_WRAPPING_KEY_TYPE_INCONSISTENT, m)
            }
            e => e,
        })?;
        if flag(&target.attrs, CKA_EXTRACTABLE)? != Some(true) {
            return refuse(Ckr::CKR_KEY_UNEXTRACTABLE, "the key is not extractable");
        }
        let Material::Aes(k) = &target.material else {
            return refuse(Ckr::CKR_KEY_NOT_WRAPPABLE, "only secret keys are wrapped");
        };
        key_wrap(kek, true, mechanism, param, k.expose()).map(|s| s.expose().to_vec())
    }

    /// `C_UnwrapKey`: the material of a key wrapped under this one.
    pub(crate) fn unwrap(
        &self,
        mechanism: u64,
        param: &[u8],
        wrapped: &[u8],
    ) -> Result<SecretBuf, HsmError> {
        let kek = self.aes(CKA_UNWRAP).map_err(|e| match e {
            HsmError::Pkcs11(Ckr::CKR_KEY_TYPE_INCONSISTENT, m) => {
                HsmError::Pkcs11(Ckr::CKR_UNWRAPPING_KEY_TYPE_INCONSISTENT, m)
            }
            e => e,
        })?;
        key_wrap(kek, false, mechanism, param, wrapped)
    }
}

/// AES-GCM with a 128-bit tag (NIST SP 800-38D): `ciphertext | tag`.
fn aes_gcm(
    key: &[u8],
    encrypt: bool,
    iv: &[u8; 12],
    aad: &[u8],
    data: &[u8],
) -> Result<SecretBuf, HsmError> {
    use aws_lc_rs::aead::{AES_128_GCM, AES_256_GCM, Aad, LessSafeKey, Nonce, UnboundKey};
    let alg = if key.len() == 16 {
        &AES_128_GCM
    } else {
        &AES_256_GCM
    };
    let k = LessSafeKey::new(UnboundKey::new(alg, key).map_err(|_| HsmError::Internal("AES key"))?);
    let nonce = Nonce::assume_unique_for_key(*iv);
    let mut buf = zeroize::Zeroizing::new(data.to_vec());
    if encrypt {
        k.seal_in_place_append_tag(nonce, Aad::from(aad), &mut *buf)
            .map_err(|_| HsmError::Internal("AES-GCM encryption failed"))?;
        Ok(SecretBuf::new(std::mem::take(&mut *buf)))
    } else {
        let n = k
            .open_in_place(nonce, Aad::from(aad), &mut buf)
            .map_err(|_| {
                HsmError::Pkcs11(
                    Ckr::CKR_ENCRYPTED_DATA_INVALID,
                    "the GCM tag does not verify".into(),
                )
            })?
            .len();
        Ok(SecretBuf::new(buf[..n].to_vec()))
    }
}

/// AES-CBC with PKCS#7 padding (SP 800-38A; RFC 5652 section 6.3).
fn aes_cbc_pad(
    key: &[u8],
    encrypt: bool,
    iv: [u8; 16],
    data: &[u8],
) -> Result<SecretBuf, HsmError> {
    use aws_lc_rs::cipher::{
        AES_128, AES_256, DecryptionContext, EncryptionContext, PaddedBlockDecryptingKey,
        PaddedBlockEncryptingKey, UnboundCipherKey,
    };
    use aws_lc_rs::iv::FixedLength;
    let alg = if key.len() == 16 { &AES_128 } else { &AES_256 };
    let unbound = || UnboundCipherKey::new(alg, key).map_err(|_| HsmError::Internal("AES key"));
    let mut buf = zeroize::Zeroizing::new(data.to_vec());
    if encrypt {
        let k = PaddedBlockEncryptingKey::cbc_pkcs7(unbound()?)
            .map_err(|_| HsmError::Internal("AES key"))?;
        k.less_safe_encrypt(&mut *buf, EncryptionContext::Iv128(FixedLength::from(iv)))
            .map_err(|_| HsmError::Internal("AES-CBC encryption failed"))?;
        Ok(SecretBuf::new(std::mem::take(&mut *buf)))
    } else {
        if data.is_empty() || !data.len().is_multiple_of(16) {
            return refuse(
                Ckr::CKR_ENCRYPTED_DATA_LEN_RANGE,
                "CBC ciphertext is whole blocks",
            );
        }
        let k = PaddedBlockDecryptingKey::cbc_pkcs7(unbound()?)
            .map_err(|_| HsmError::Internal("AES key"))?;
        let n = k
            .decrypt(&mut buf, DecryptionContext::Iv128(FixedLength::from(iv)))
            .map_err(|_| HsmError::Pkcs11(Ckr::CKR_ENCRYPTED_DATA_INVALID, "bad padding".into()))?
            .len();
        Ok(SecretBuf::new(buf[..n].to_vec()))
    }
}

/// AES key wrap (RFC 3394, `CKM_AES_KEY_WRAP`) and with padding (RFC
/// 5649: `CKM_AES_KEY_WRAP_KWP`, and `CKM_AES_KEY_WRAP_PAD` as v2.40 and
/// SoftHSMv2 define it). Only the default initial values.
fn key_wrap(
    kek: &[u8],
    wrap: bool,
    mechanism: u64,
    param: &[u8],
    input: &[u8],
) -> Result<SecretBuf, HsmError> {
    use aws_lc_rs::key_wrap::{AES_128, AES_256, AesKek, KeyWrap, KeyWrapPadded};
    let padded = match mechanism {
        CKM_AES_KEY_WRAP => false,
        CKM_AES_KEY_WRAP_PAD | CKM_AES_KEY_WRAP_KWP => true,
        _ => return refuse(Ckr::CKR_MECHANISM_INVALID, "AES key wrap mechanisms only"),
    };
    if !param.is_empty() {
        return refuse(
            Ckr::CKR_MECHANISM_PARAM_INVALID,
            "only the default initial value",
        );
    }
    let cipher = if kek.len() == 16 { &AES_128 } else { &AES_256 };
    let k = || AesKek::new(cipher, kek).map_err(|_| HsmError::Internal("AES key"));
    let mut out = zeroize::Zeroizing::new(vec![0u8; input.len() + 16]);
    let bad = |wrap: bool| {
        if wrap {
            HsmError::Pkcs11(
                Ckr::CKR_KEY_NOT_WRAPPABLE,
                "the key's length does not wrap".into(),
            )
        } else {
            HsmError::Pkcs11(
                Ckr::CKR_WRAPPED_KEY_INVALID,
                "the wrapped key does not verify".into(),
            )
        }
    };
    let n = match (wrap, padded) {
        (true, false) => k()?.wrap(input, &mut out).map_err(|_| bad(true))?.len(),
        (true, true) => k()?
            .wrap_with_padding(input, &mut out)
            .map_err(|_| bad(true))?
            .len(),
        (false, false) => {
            if input.len() < 24 || !input.len().is_multiple_of(8) {
                return refuse(
                    Ckr::CKR_WRAPPED_KEY_LEN_RANGE,
                    "RFC 3394 output is 8n bytes, n >= 3",
                );
            }
            k()?.unwrap(input, &mut out).map_err(|_| bad(false))?.len()
        }
        (false, true) => {
            if input.len() < 16 || !input.len().is_multiple_of(8) {
                return refuse(
                    Ckr::CKR_WRAPPED_KEY_LEN_RANGE,
                    "RFC 5649 output is 8n bytes, n >= 2",
                );
            }
            k()?.unwrap_with_padding(input, &mut out)
                .map_err(|_| bad(false))?
                .len()
        }
    };
    Ok(SecretBuf::new(out[..n].to_vec()))
}

/// A SHA-2 hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hash {
    S256,
    S384,
    S512,
}

impl Hash {
    fn digest(self) -> &'static digest::Algorithm {
        match self {
            Hash::S256 => &digest::SHA256,
            Hash::S384 => &digest::SHA384,
            Hash::S512 => &digest::SHA512,
        }
    }
}

/// An RSA signature scheme (RFC 8017 sections 8.1 and 8.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RsaSig {
    Pkcs1(Hash),
    Pss(Hash),
}

impl RsaSig {
    fn hash(self) -> Hash {
        match self {
            RsaSig::Pkcs1(h) | RsaSig::Pss(h) => h,
        }
    }
    fn signing(self) -> &'static dyn signature::RsaEncoding {
        match self {
            RsaSig::Pkcs1(Hash::S256) => &signature::RSA_PKCS1_SHA256,
            RsaSig::Pkcs1(Hash::S384) => &signature::RSA_PKCS1_SHA384,
            RsaSig::Pkcs1(Hash::S512) => &signature::RSA_PKCS1_SHA512,
            RsaSig::Pss(Hash::S256) => &signature::RSA_PSS_SHA256,
            RsaSig::Pss(Hash::S384) => &signature::RSA_PSS_SHA384,
            RsaSig::Pss(Hash::S512) => &signature::RSA_PSS_SHA512,
        }
    }
    fn verifying(self) -> &'static dyn signature::VerificationAlgorithm {
        match self {
            RsaSig::Pkcs1(Hash::S256) => &signature::RSA_PKCS1_2048_8192_SHA256,
            RsaSig::Pkcs1(Hash::S384) => &signature::RSA_PKCS1_2048_8192_SHA384,
            RsaSig::Pkcs1(Hash::S512) => &signature::RSA_PKCS1_2048_8192_SHA512,
            RsaSig::Pss(Hash::S256) => &signature::RSA_PSS_2048_8192_SHA256,
            RsaSig::Pss(Hash::S384) => &signature::RSA_PSS_2048_8192_SHA384,
            RsaSig::Pss(Hash::S512) => &signature::RSA_PSS_2048_8192_SHA512,
        }
    }
    /// The hash as aws-lc takes it.
    fn digest(self, hash: &[u8]) -> Result<digest::Digest, HsmError> {
        digest::Digest::import_less_safe(hash, self.hash().digest())
            .map_err(|_| HsmError::Pkcs11(Ckr::CKR_DATA_LEN_RANGE, "not the hash's length".into()))
    }
}

/// The RSA scheme for a signing mechanism and the hash to sign
/// (`CKM_RSA_PKCS`, which signs the bytes given, is `tde_raw_rsa`'s):
/// `CKM_RSA_PKCS_PSS` the hash with
/// `CK_RSA_PKCS_PSS_PARAMS` (flattened: `hashAlg | mgf | sLen`, u64 BE),
/// the `SHAn_*` mechanisms the hash the module computed.
fn rsa_scheme<'a>(
    mechanism: u64,
    param: &[u8],
    data: &'a [u8],
) -> Result<(RsaSig, &'a [u8]), HsmError> {
    let pss = |fixed: Option<Hash>| -> Result<RsaSig, HsmError> {
        let p: [u8; 24] = param.try_into().map_err(|_| {
            HsmError::Pkcs11(
                Ckr::CKR_MECHANISM_PARAM_INVALID,
                "CK_RSA_PKCS_PSS_PARAMS".into(),
            )
        })?;
        let field = |i: usize| {
            let mut b = [0u8; 8];
            b.copy_from_slice(&p[i * 8..i * 8 + 8]);
            u64::from_be_bytes(b)
        };
        let (hash, mgf, len) = match field(0) {
            CKM_SHA256 => (Hash::S256, CKG_MGF1_SHA256, 32),
            CKM_SHA384 => (Hash::S384, CKG_MGF1_SHA384, 48),
            CKM_SHA512 => (Hash::S512, CKG_MGF1_SHA512, 64),
            _ => {
                return refuse(
                    Ckr::CKR_MECHANISM_PARAM_INVALID,
                    "PSS hashAlg: SHA-256/384/512",
                );
            }
        };
        if fixed.is_some_and(|f| f != hash) || field(1) != mgf || field(2) != len {
            return refuse(
                Ckr::CKR_MECHANISM_PARAM_INVALID,
                "PSS: MGF1 with the same hash, salt as long as the hash",
            );
        }
        Ok(RsaSig::Pss(hash))
    };
    let plain = |s: RsaSig| -> Result<RsaSig, HsmError> {
        if param.is_empty() {
            Ok(s)
        } else {
            refuse(
                Ckr::CKR_MECHANISM_PARAM_INVALID,
                "this mechanism takes no parameter",
            )
        }
    };
    Ok(match mechanism {
        CKM_SHA256_RSA_PKCS => (plain(RsaSig::Pkcs1(Hash::S256))?, data),
        CKM_SHA384_RSA_PKCS => (plain(RsaSig::Pkcs1(Hash::S384))?, data),
        CKM_SHA512_RSA_PKCS => (plain(RsaSig::Pkcs1(Hash::S512))?, data),
        CKM_RSA_PKCS_PSS => (pss(None)?, data),
        CKM_SHA256_RSA_PKCS_PSS => (pss(Some(Hash::S256))?, data),
        CKM_SHA384_RSA_PKCS_PSS => (pss(Some(Hash::S384))?, data),
        CKM_SHA512_RSA_PKCS_PSS => (pss(Some(Hash::S512))?, data),
        _ => {
            return refuse(
                Ckr::CKR_MECHANISM_INVALID,
                "not an RSA signing mechanism tde offers",
            );
        }
    })
}

/// The value ECDSA signs: for `CKM_ECDSA` the given hash, taken to the
/// curve order's length; for `CKM_ECDSA_SHAn` the module's hash, likewise.
fn ecdsa_input(curve: Curve, mechanism: u64, data: &[u8]) -> Result<digest::Digest, HsmError> {
    let want = match mechanism {
        CKM_ECDSA => None,
        CKM_ECDSA_SHA256 => Some(32),
        CKM_ECDSA_SHA384 => Some(48),
        CKM_ECDSA_SHA512 => Some(64),
        _ => return refuse(Ckr::CKR_MECHANISM_INVALID, "not an ECDSA mechanism"),
    };
    if data.is_empty() || data.len() > 64 || want.is_some_and(|w| w != data.len()) {
        return refuse(
            Ckr::CKR_DATA_LEN_RANGE,
            "ECDSA signs a hash of at most 64 bytes",
        );
    }
    let alg = curve.digest();
    let n = alg.output_len();
    let mut e = [0u8; 64];
    if data.len() >= n {
        e[..n].copy_from_slice(&data[..n]);
    } else {
        e[n - data.len()..n].copy_from_slice(data);
    }
    digest::Digest::import_less_safe(&e[..n], alg).map_err(|_| HsmError::Internal("digest"))
}

/// `CK_RSA_PKCS_OAEP_PARAMS` flattened: `hashAlg | mgf`, u64 BE (the
/// label travels as the request's AAD).
fn oaep(param: &[u8]) -> Result<&'static aws_lc_rs::rsa::OaepAlgorithm, HsmError> {
    use aws_lc_rs::rsa::{
        OAEP_SHA1_MGF1SHA1, OAEP_SHA256_MGF1SHA256, OAEP_SHA384_MGF1SHA384, OAEP_SHA512_MGF1SHA512,
    };
    let p: [u8; 16] = param.try_into().map_err(|_| {
        HsmError::Pkcs11(
            Ckr::CKR_MECHANISM_PARAM_INVALID,
            "CK_RSA_PKCS_OAEP_PARAMS".into(),
        )
    })?;
    let hash = u64::from_be_bytes(p[..8].try_into().unwrap_or_default());
    let mgf = u64::from_be_bytes(p[8..].try_into().unwrap_or_default());
    match (hash, mgf) {
        (CKM_SHA_1, CKG_MGF1_SHA1) => Ok(&OAEP_SHA1_MGF1SHA1),
        (CKM_SHA256, CKG_MGF1_SHA256) => Ok(&OAEP_SHA256_MGF1SHA256),
        (CKM_SHA384, CKG_MGF1_SHA384) => Ok(&OAEP_SHA384_MGF1SHA384),
        (CKM_SHA512, CKG_MGF1_SHA512) => Ok(&OAEP_SHA512_MGF1SHA512),
        _ => refuse(
            Ckr::CKR_MECHANISM_PARAM_INVALID,
            "OAEP: SHA-1/256/384/512 with MGF1 of the same hash",
        ),
    }
}

fn no_param(param: &[u8]) -> Result<(), HsmError> {
    if param.is_empty() {
        Ok(())
    } else {
        refuse(
            Ckr::CKR_MECHANISM_PARAM_INVALID,
            "this mechanism takes no parameter",
        )
    }
}

/// The material a sealed record of kind 5 holds (an AES key or a PKCS#8
/// private key), for the workspace's key-material scans only.
#[cfg(feature = "internals")]
#[doc(hidden)]
pub fn material_of(record: &[u8]) -> Option<Vec<u8>> {
    decode(record).ok()?.material.stored().map(<[u8]>::to_vec)
}

/// A new object's id: random, never 0.
pub(crate) fn new_id() -> Result<u64, HsmError> {
    loop {
        let mut b = [0u8; 8];
        random::fill(&mut b)?;
        let id = u64::from_be_bytes(b) >> 1;
        if id != 0 {
            return Ok(id);
        }
    }
}

#[cfg(test)]
mod tests;
