//! The C side of the module: the exported entry points (`C_GetFunctionList`,
//! `C_GetInterfaceList`, `C_GetInterface`), the v2.40 and v3.0 function
//! lists, and one `extern "C"` function per Cryptoki function. Each checks
//! its pointers, converts to Rust types, calls [`crate::module`] and writes
//! the results back; each runs inside [`guard`], so no panic crosses into
//! C. This is the only module with `unsafe`.
//!
//! Functions the module does not implement return
//! `CKR_FUNCTION_NOT_SUPPORTED` (PKCS#11 v3.0 section 5.1).

#![allow(unsafe_code)]

use std::ffi::c_void;
use std::panic::{AssertUnwindSafe, catch_unwind};

use cryptoki_sys::*;

use crate::module::{self, Out, Rv};

// Short names for the C types in signatures.
type H = CK_SESSION_HANDLE;
type O = CK_OBJECT_HANDLE;
type B = *mut CK_BYTE;
type L = CK_ULONG;
type PL = *mut CK_ULONG;
type M = *mut CK_MECHANISM;
type A = *mut CK_ATTRIBUTE;
type U = *mut CK_UTF8CHAR;
type V = *mut c_void;

/// `CK_UNAVAILABLE_INFORMATION` (the bindings skip this macro).
const UNAVAILABLE: CK_ULONG = !0;
/// `CK_EFFECTIVELY_INFINITE`.
const INFINITE: CK_ULONG = 0;
const MANUFACTURER: &str = "tde";

/// Runs `f`, turning an error into its return value and a panic into
/// `CKR_GENERAL_ERROR`: a panic must never unwind into C.
fn guard(f: impl FnOnce() -> Result<(), Rv>) -> CK_RV {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => CKR_OK,
        Ok(Err(rv)) => rv,
        Err(_) => CKR_GENERAL_ERROR,
    }
}

/// `s` blank-padded to `N` bytes (PKCS#11 text fields are not
/// NUL-terminated), cut at a character boundary if too long.
fn padded<const N: usize>(s: &str) -> [u8; N] {
    let mut out = [b' '; N];
    let mut end = s.len().min(N);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out[..end].copy_from_slice(&s.as_bytes()[..end]);
    out
}

const fn version(major: u8, minor: u8) -> CK_VERSION {
    CK_VERSION { major, minor }
}

fn crate_version() -> CK_VERSION {
    let mut v = env!("CARGO_PKG_VERSION")
        .split('.')
        .map(|n| n.parse().unwrap_or(0));
    version(v.next().unwrap_or(0), v.next().unwrap_or(0))
}

/// Writes `value` to `p`.
///
/// # Safety
/// `p` must be null or valid for a write of `T` (the caller's out
/// parameter, as the function's contract in the standard says).
unsafe fn put<T>(p: *mut T, value: T) -> Result<(), Rv> {
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null, and valid for a write of T by the caller's
    // contract; `write` does not read or drop the old contents.
    unsafe { p.write(value) };
    Ok(())
}

/// The `len` bytes at `p` (empty if `len` is 0, whatever `p` is).
///
/// # Safety
/// If `len` > 0, `p` must be null or valid for `len` bytes that stay
/// unchanged during the call.
unsafe fn bytes<'a>(p: *const u8, len: CK_ULONG) -> Result<&'a [u8], Rv> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let len = usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?;
    // SAFETY: non-null and valid for `len` bytes by the caller's contract.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Returns a list the PKCS#11 way (section 5.2): with a null buffer, only
/// the count; with one too small, the count and `CKR_BUFFER_TOO_SMALL`;
/// otherwise the items and their count.
///
/// # Safety
/// `count` must be null or valid for reads and writes of a `CK_ULONG`;
/// `out`, if not null, valid for `*count` items.
unsafe fn put_list<T: Copy>(items: &[T], out: *mut T, count: *mut CK_ULONG) -> Result<(), Rv> {
    if count.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let n = items.len() as CK_ULONG;
    if out.is_null() {
        // SAFETY: non-null, valid for a write by the caller's contract.
        unsafe { count.write(n) };
        return Ok(());
    }
    // SAFETY: non-null, valid for a read by the caller's contract.
    let room = unsafe { count.read() };
    // SAFETY: as above, for the write.
    unsafe { count.write(n) };
    if room < n {
        return Err(CKR_BUFFER_TOO_SMALL);
    }
    // SAFETY: `out` is valid for `room` >= `n` items by the caller's
    // contract, and does not overlap `items` (the module's own memory).
    unsafe { std::ptr::copy_nonoverlapping(items.as_ptr(), out, items.len()) };
    Ok(())
}

/// What a caller's output buffer allows (see [`Out`]).
///
/// # Safety
/// `len` must be null or valid for a read of a `CK_ULONG`.
unsafe fn room(out: *mut u8, len: *mut CK_ULONG) -> Result<Out, Rv> {
    if len.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    if out.is_null() {
        return Ok(Out::Length);
    }
    // SAFETY: non-null, valid for a read by the caller's contract.
    let n = unsafe { len.read() };
    Ok(Out::Buffer(usize::try_from(n).unwrap_or(usize::MAX)))
}

/// Finishes a call that returns bytes: the bytes, or the length needed
/// (`CKR_BUFFER_TOO_SMALL` if the caller gave a buffer).
///
/// # Safety
/// `len` must be valid for a write of a `CK_ULONG`; `out`, if not null,
/// valid for as many bytes as `*len` said on entry (at least `r`'s bytes).
unsafe fn put_bytes<B: AsRef<[u8]>>(
    r: Result<B, usize>,
    out: *mut u8,
    len: *mut CK_ULONG,
) -> Result<(), Rv> {
    match r {
        Ok(b) => {
            let b = b.as_ref();
            // SAFETY: the module returns bytes only when the caller's
            // buffer holds them (`room`); `out` is then non-null.
            unsafe { std::ptr::copy_nonoverlapping(b.as_ptr(), out, b.len()) };
            // SAFETY: `len` was checked non-null by `room`.
            unsafe { len.write(b.len() as CK_ULONG) };
            Ok(())
        }
        Err(need) => {
            // SAFETY: as above.
            unsafe { len.write(need as CK_ULONG) };
            if out.is_null() {
                Ok(())
            } else {
                Err(CKR_BUFFER_TOO_SMALL)
            }
        }
    }
}

/// The mechanism type of a `CK_MECHANISM`.
///
/// # Safety
/// `m` must be null or valid for a read of a `CK_MECHANISM`.
unsafe fn mechanism_type(m: *const CK_MECHANISM) -> Result<CK_MECHANISM_TYPE, Rv> {
    if m.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null and valid by the caller's contract.
    Ok(unsafe { (*m).mechanism })
}

// ---------------------------------------------------------------------------
// General purpose.

extern "C" fn fork_prepare() {
    let _ = catch_unwind(module::before_fork);
}

extern "C" fn fork_done() {
    let _ = catch_unwind(module::after_fork);
}

unsafe extern "C" fn c_initialize(args: *mut c_void) -> CK_RV {
    guard(|| {
        static ATFORK: std::sync::Once = std::sync::Once::new();
        ATFORK.call_once(|| {
            // SAFETY: the handlers are plain functions of this library that
            // never unwind; glibc registers them with this library's
            // handle and drops them if it is unloaded.
            unsafe { libc::pthread_atfork(Some(fork_prepare), Some(fork_done), Some(fork_done)) };
        });
        if !args.is_null() {
            // SAFETY: non-null; the standard says it points at a
            // CK_C_INITIALIZE_ARGS.
            let a = unsafe { &*(args as *const CK_C_INITIALIZE_ARGS) };
            if !a.pReserved.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            let fns = [
                a.CreateMutex.is_some(),
                a.DestroyMutex.is_some(),
                a.LockMutex.is_some(),
                a.UnlockMutex.is_some(),
            ];
            if fns.iter().any(|f| *f) && !fns.iter().all(|f| *f) {
                return Err(CKR_ARGUMENTS_BAD);
            }
            // The module locks with the OS's primitives; an application
            // that insists on its own locks cannot have them.
            if fns[0] && a.flags & CKF_OS_LOCKING_OK == 0 {
                return Err(CKR_CANT_LOCK);
            }
        }
        module::initialize()
    })
}

unsafe extern "C" fn c_finalize(reserved: *mut c_void) -> CK_RV {
    guard(|| {
        if !reserved.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        module::finalize()
    })
}

unsafe extern "C" fn c_get_info(info: *mut CK_INFO) -> CK_RV {
    guard(|| {
        module::slot_list(false)?;
        let i = CK_INFO {
            cryptokiVersion: version(3, 0),
            manufacturerID: padded(MANUFACTURER),
            flags: 0,
            libraryDescription: padded("tde PKCS#11 module"),
            libraryVersion: crate_version(),
        };
        // SAFETY: the caller's out parameter.
        unsafe { put(info, i) }
    })
}

unsafe extern "C" fn c_get_function_list(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's out parameter. The list is a static the
        // caller only reads (the standard's contract).
        unsafe { put(list, &FUNCTIONS as *const _ as *mut CK_FUNCTION_LIST) }
    })
}

/// The entry point every PKCS#11 application looks up.
///
/// # Safety
/// `list` must be null or valid for a write of a pointer.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetFunctionList(list: *mut *mut CK_FUNCTION_LIST) -> CK_RV {
    // SAFETY: the same contract.
    unsafe { c_get_function_list(list) }
}

/// The interfaces: v3.0 first (the default), then v2.40.
struct Interfaces([CK_INTERFACE; 2]);

// SAFETY: the interfaces point only at static, immutable data (a name and
// the function lists), which any thread may read.
unsafe impl Sync for Interfaces {}

const INTERFACE_NAME: &[u8] = b"PKCS 11\0";

static INTERFACES: Interfaces = Interfaces([
    CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &FUNCTIONS_3_0 as *const CK_FUNCTION_LIST_3_0 as *mut c_void,
        flags: 0,
    },
    CK_INTERFACE {
        pInterfaceName: INTERFACE_NAME.as_ptr() as *mut CK_UTF8CHAR,
        pFunctionList: &FUNCTIONS as *const CK_FUNCTION_LIST as *mut c_void,
        flags: 0,
    },
]);

unsafe extern "C" fn c_get_interface_list(list: *mut CK_INTERFACE, count: *mut CK_ULONG) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's list and count, per the standard.
        unsafe { put_list(&INTERFACES.0, list, count) }
    })
}

unsafe extern "C" fn c_get_interface(
    name: *mut CK_UTF8CHAR,
    want: *mut CK_VERSION,
    out: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    guard(|| {
        if !name.is_null() {
            // SAFETY: non-null; the standard says a NUL-terminated string.
            let n = unsafe { std::ffi::CStr::from_ptr(name as *const std::ffi::c_char) };
            if n.to_bytes_with_nul() != INTERFACE_NAME {
                return Err(CKR_ARGUMENTS_BAD);
            }
        }
        let wanted = if want.is_null() {
            None
        } else {
            // SAFETY: non-null, the caller's CK_VERSION.
            Some(unsafe { want.read() })
        };
        // No interface has flags: asking for any matches none.
        if flags != 0 {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let i = match wanted.map(|v| (v.major, v.minor)) {
            None | Some((3, 0)) => 0,
            Some((2, 40)) => 1,
            Some(_) => return Err(CKR_ARGUMENTS_BAD),
        };
        // SAFETY: the caller's out parameter; the interface is static.
        unsafe {
            put(
                out,
                &INTERFACES.0[i] as *const CK_INTERFACE as *mut CK_INTERFACE,
            )
        }
    })
}

/// PKCS#11 v3.0: the interfaces this module offers.
///
/// # Safety
/// `list` must be null or valid for `*count` interfaces; `count` valid for
/// a read and a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetInterfaceList(
    list: *mut CK_INTERFACE,
    count: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the same contract.
    unsafe { c_get_interface_list(list, count) }
}

/// PKCS#11 v3.0: one interface, by name and version (null: the default).
///
/// # Safety
/// `name` null or a NUL-terminated string, `version` null or valid for a
/// read, `out` valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn C_GetInterface(
    name: *mut CK_UTF8CHAR,
    version: *mut CK_VERSION,
    out: *mut *mut CK_INTERFACE,
    flags: CK_FLAGS,
) -> CK_RV {
    // SAFETY: the same contract.
    unsafe { c_get_interface(name, version, out, flags) }
}

// ---------------------------------------------------------------------------
// Slots and tokens.

unsafe extern "C" fn c_get_slot_list(
    present: CK_BBOOL,
    list: *mut CK_SLOT_ID,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let slots = module::slot_list(present != 0)?;
        // SAFETY: the caller's list and count.
        unsafe { put_list(&slots, list, count) }
    })
}

unsafe extern "C" fn c_get_slot_info(id: CK_SLOT_ID, info: *mut CK_SLOT_INFO) -> CK_RV {
    guard(|| {
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let s = module::slot_info(id)?;
        let v = crate_version();
        let i = CK_SLOT_INFO {
            slotDescription: padded(&s.description),
            manufacturerID: padded(MANUFACTURER),
            flags: s.flags,
            hardwareVersion: v,
            firmwareVersion: v,
        };
        // SAFETY: the caller's out parameter.
        unsafe { put(info, i) }
    })
}

unsafe extern "C" fn c_get_token_info(id: CK_SLOT_ID, info: *mut CK_TOKEN_INFO) -> CK_RV {
    guard(|| {
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let t = module::token_info(id)?;
        let mut server = t.server_version.split('.').map(|n| n.parse().unwrap_or(0));
        let firmware = version(server.next().unwrap_or(0), server.next().unwrap_or(0));
        let i = CK_TOKEN_INFO {
            label: padded(&t.label),
            manufacturerID: padded(MANUFACTURER),
            model: padded("tde sidecar"),
            serialNumber: padded(&t.serial),
            flags: t.flags,
            ulMaxSessionCount: INFINITE,
            ulSessionCount: t.sessions,
            ulMaxRwSessionCount: INFINITE,
            ulRwSessionCount: t.rw_sessions,
            ulMaxPinLen: 1024,
            ulMinPinLen: 1,
            ulTotalPublicMemory: UNAVAILABLE,
            ulFreePublicMemory: UNAVAILABLE,
            ulTotalPrivateMemory: UNAVAILABLE,
            ulFreePrivateMemory: UNAVAILABLE,
            hardwareVersion: crate_version(),
            firmwareVersion: firmware,
            utcTime: padded(""),
        };
        // SAFETY: the caller's out parameter.
        unsafe { put(info, i) }
    })
}

unsafe extern "C" fn c_get_mechanism_list(
    id: CK_SLOT_ID,
    list: *mut CK_MECHANISM_TYPE,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let m = module::mechanism_list(id)?;
        // SAFETY: the caller's list and count.
        unsafe { put_list(&m, list, count) }
    })
}

unsafe extern "C" fn c_get_mechanism_info(
    id: CK_SLOT_ID,
    mechanism: CK_MECHANISM_TYPE,
    info: *mut CK_MECHANISM_INFO,
) -> CK_RV {
    guard(|| {
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let (min, max, flags) = module::mechanism_info(id, mechanism)?;
        let i = CK_MECHANISM_INFO {
            ulMinKeySize: min,
            ulMaxKeySize: max,
            flags,
        };
        // SAFETY: the caller's out parameter.
        unsafe { put(info, i) }
    })
}

// ---------------------------------------------------------------------------
// Sessions.

unsafe extern "C" fn c_open_session(
    id: CK_SLOT_ID,
    flags: CK_FLAGS,
    _application: *mut c_void,
    _notify: CK_NOTIFY,
    session: *mut CK_SESSION_HANDLE,
) -> CK_RV {
    guard(|| {
        if session.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let h = module::open_session(id, flags)?;
        // SAFETY: the caller's out parameter.
        unsafe { put(session, h) }
    })
}

extern "C" fn c_close_session(h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| module::close_session(h))
}

extern "C" fn c_close_all_sessions(id: CK_SLOT_ID) -> CK_RV {
    guard(|| module::close_all_sessions(id))
}

unsafe extern "C" fn c_get_session_info(h: CK_SESSION_HANDLE, info: *mut CK_SESSION_INFO) -> CK_RV {
    guard(|| {
        if info.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let (slot, state, flags) = module::session_info(h)?;
        let i = CK_SESSION_INFO {
            slotID: slot,
            state,
            flags,
            ulDeviceError: 0,
        };
        // SAFETY: the caller's out parameter.
        unsafe { put(info, i) }
    })
}

// ---------------------------------------------------------------------------
// Login.

unsafe extern "C" fn c_login(
    h: CK_SESSION_HANDLE,
    user_type: CK_USER_TYPE,
    pin: *mut CK_UTF8CHAR,
    pin_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        // No protected authentication path: a PIN is always given.
        if pin.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller's PIN buffer.
        let pin = unsafe { bytes(pin, pin_len) }?;
        module::login(h, user_type, pin)
    })
}

extern "C" fn c_logout(h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| module::logout(h))
}

// ---------------------------------------------------------------------------
// Objects.

/// A caller's attribute array.
///
/// # Safety
/// If `count` > 0, `template` must be null or valid for `count` attributes.
unsafe fn attributes<'a>(
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> Result<&'a mut [CK_ATTRIBUTE], Rv> {
    if count == 0 {
        return Ok(&mut []);
    }
    if template.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    let n = usize::try_from(count).map_err(|_| CKR_ARGUMENTS_BAD)?;
    // SAFETY: non-null and valid for `count` attributes by the caller's
    // contract; nothing else uses them during the call.
    Ok(unsafe { std::slice::from_raw_parts_mut(template, n) })
}

/// A caller's template as `(type, value)` pairs.
///
/// # Safety
/// As [`attributes`], and each attribute's `pValue` valid for its
/// `ulValueLen` bytes.
unsafe fn template_of(
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> Result<Vec<(CK_ATTRIBUTE_TYPE, Vec<u8>)>, Rv> {
    // SAFETY: the caller's template.
    let attrs = unsafe { attributes(template, count) }?;
    if attrs.len() > tde_protocol::message::MAX_P11_ATTRS {
        return Err(CKR_TEMPLATE_INCONSISTENT);
    }
    let mut out = Vec::with_capacity(attrs.len());
    for a in attrs.iter() {
        if a.ulValueLen as usize > tde_protocol::message::MAX_P11_ATTR {
            return Err(CKR_ATTRIBUTE_VALUE_INVALID);
        }
        // SAFETY: each value is the caller's buffer of ulValueLen bytes.
        let v = unsafe { bytes(a.pValue as *const u8, a.ulValueLen) }?;
        out.push((a.type_, v.to_vec()));
    }
    Ok(out)
}

unsafe extern "C" fn c_find_objects_init(
    h: CK_SESSION_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's template.
        let want = unsafe { template_of(template, count) }?;
        module::find_objects_init(h, &want)
    })
}

unsafe extern "C" fn c_find_objects(
    h: CK_SESSION_HANDLE,
    out: *mut CK_OBJECT_HANDLE,
    max: CK_ULONG,
    count: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        if count.is_null() || (out.is_null() && max > 0) {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let found = module::find_objects(h, usize::try_from(max).unwrap_or(usize::MAX))?;
        // SAFETY: `out` holds `max` >= found.len() handles by the caller's
        // contract (non-null when max > 0, checked above).
        if !found.is_empty() {
            unsafe { std::ptr::copy_nonoverlapping(found.as_ptr(), out, found.len()) };
        }
        // SAFETY: non-null, the caller's out parameter.
        unsafe { count.write(found.len() as CK_ULONG) };
        Ok(())
    })
}

extern "C" fn c_find_objects_final(h: CK_SESSION_HANDLE) -> CK_RV {
    guard(|| module::find_objects_final(h))
}

/// `C_GetAttributeValue` (PKCS#11 v3.0 section 5.7): each attribute's
/// length, or its value when the caller gave room; a sensitive or unknown
/// attribute, or one whose buffer is too small, gets
/// `CK_UNAVAILABLE_INFORMATION` and its error, and the others are still
/// answered.
unsafe extern "C" fn c_get_attribute_value(
    h: CK_SESSION_HANDLE,
    handle: CK_OBJECT_HANDLE,
    template: *mut CK_ATTRIBUTE,
    count: CK_ULONG,
) -> CK_RV {
    guard(|| {
        let object = module::object(h, handle)?;
        // SAFETY: the caller's template.
        let attrs = unsafe { attributes(template, count) }?;
        let mut rv = Ok(());
        for a in attrs.iter_mut() {
            match object.attribute(a.type_) {
                Err(e) => {
                    a.ulValueLen = UNAVAILABLE;
                    rv = Err(e);
                }
                Ok(None) => {
                    a.ulValueLen = UNAVAILABLE;
                    rv = Err(CKR_ATTRIBUTE_SENSITIVE);
                }
                Ok(Some(v)) if a.pValue.is_null() => a.ulValueLen = v.len() as CK_ULONG,
                Ok(Some(v)) if (a.ulValueLen as usize) < v.len() => {
                    a.ulValueLen = UNAVAILABLE;
                    rv = Err(CKR_BUFFER_TOO_SMALL);
                }
                Ok(Some(v)) => {
                    // SAFETY: the caller's buffer holds ulValueLen >= v.len()
                    // bytes (checked above).
                    unsafe {
                        std::ptr::copy_nonoverlapping(v.as_ptr(), a.pValue as *mut u8, v.len())
                    };
                    a.ulValueLen = v.len() as CK_ULONG;
                }
            }
        }
        rv
    })
}

// ---------------------------------------------------------------------------
// Encryption and decryption.

/// `CK_GCM_PARAMS` as PKCS#11 v2.40's text describes it, without
/// `ulIvBits` (40 bytes on LP64). SunPKCS11 and others send this layout
/// or the header's (48 bytes, with `ulIvBits`); the length tells which.
#[repr(C)]
#[allow(non_snake_case)]
struct GcmParamsNoIvBits {
    pIv: *mut CK_BYTE,
    ulIvLen: CK_ULONG,
    pAAD: *mut CK_BYTE,
    ulAADLen: CK_ULONG,
    ulTagBits: CK_ULONG,
}

/// The mechanism a caller passed, with its parameters checked.
///
/// # Safety
/// `m` must be null or valid for a read of a `CK_MECHANISM` whose
/// `pParameter` is valid for `ulParameterLen` bytes.
unsafe fn mechanism(m: *const CK_MECHANISM) -> Result<module::Mechanism, Rv> {
    if m.is_null() {
        return Err(CKR_ARGUMENTS_BAD);
    }
    // SAFETY: non-null and valid by the caller's contract.
    let m = unsafe { &*m };
    let p = m.pParameter;
    let len = m.ulParameterLen as usize;
    let bad = CKR_MECHANISM_PARAM_INVALID;
    match m.mechanism {
        CKM_AES_GCM => {
            if p.is_null() {
                return Err(bad);
            }
            // SAFETY: `p` is valid for `len` bytes, which is the size of
            // the layout read in each arm; read_unaligned asks nothing of
            // alignment.
            let (iv, iv_len, aad, aad_len, tag_bits) =
                if len == std::mem::size_of::<CK_GCM_PARAMS>() {
                    let g = unsafe { (p as *const CK_GCM_PARAMS).read_unaligned() };
                    (g.pIv, g.ulIvLen, g.pAAD, g.ulAADLen, g.ulTagBits)
                } else if len == std::mem::size_of::<GcmParamsNoIvBits>() {
                    let g = unsafe { (p as *const GcmParamsNoIvBits).read_unaligned() };
                    (g.pIv, g.ulIvLen, g.pAAD, g.ulAADLen, g.ulTagBits)
                } else {
                    return Err(bad);
                };
            if tag_bits != 128 || iv_len != 12 || iv.is_null() {
                return Err(bad);
            }
            if aad_len as usize > tde_protocol::message::MAX_AAD {
                return Err(bad);
            }
            // SAFETY: the IV and AAD buffers of the caller's parameters.
            let iv: [u8; 12] = unsafe { bytes(iv, iv_len) }?.try_into().map_err(|_| bad)?;
            let aad = unsafe { bytes(aad, aad_len) }.map_err(|_| bad)?.to_vec();
            Ok(module::Mechanism::AesGcm { iv, aad })
        }
        CKM_AES_CBC_PAD => {
            if len != 16 {
                return Err(bad);
            }
            // SAFETY: the caller's 16-byte IV.
            let iv: [u8; 16] = unsafe { bytes(p as *const u8, 16) }?
                .try_into()
                .map_err(|_| bad)?;
            Ok(module::Mechanism::AesCbcPad { iv })
        }
        CKM_RSA_PKCS_OAEP => {
            if p.is_null() || len != std::mem::size_of::<CK_RSA_PKCS_OAEP_PARAMS>() {
                return Err(bad);
            }
            // SAFETY: `p` is valid for a CK_RSA_PKCS_OAEP_PARAMS (length
            // checked); read_unaligned asks nothing of alignment.
            let o = unsafe { (p as *const CK_RSA_PKCS_OAEP_PARAMS).read_unaligned() };
            let label = match o.source {
                0 => Vec::new(),
                CKZ_DATA_SPECIFIED => {
                    if o.ulSourceDataLen as usize > tde_protocol::message::MAX_AAD {
                        return Err(bad);
                    }
                    // SAFETY: the caller's label buffer.
                    unsafe { bytes(o.pSourceData as *const u8, o.ulSourceDataLen) }
                        .map_err(|_| bad)?
                        .to_vec()
                }
                _ => return Err(bad),
            };
            Ok(module::Mechanism::Oaep {
                hash: o.hashAlg,
                mgf: o.mgf,
                label,
            })
        }
        CKM_RSA_PKCS_PSS
        | CKM_SHA256_RSA_PKCS_PSS
        | CKM_SHA384_RSA_PKCS_PSS
        | CKM_SHA512_RSA_PKCS_PSS => {
            if p.is_null() || len != std::mem::size_of::<CK_RSA_PKCS_PSS_PARAMS>() {
                return Err(bad);
            }
            // SAFETY: `p` is valid for a CK_RSA_PKCS_PSS_PARAMS (length
            // checked).
            let o = unsafe { (p as *const CK_RSA_PKCS_PSS_PARAMS).read_unaligned() };
            Ok(module::Mechanism::Pss {
                mechanism: m.mechanism,
                hash: o.hashAlg,
                mgf: o.mgf,
                salt: o.sLen,
            })
        }
        CKM_AES_KEY_WRAP | CKM_AES_KEY_WRAP_PAD | CKM_AES_KEY_WRAP_KWP if len != 0 => {
            // Only the default initial value.
            Err(bad)
        }
        other => Ok(module::Mechanism::Plain(other)),
    }
}

/// A call that fails (other than a length query) ends the operation.
fn end_crypt_on_error(h: CK_SESSION_HANDLE, r: &Result<(), Rv>) {
    if matches!(r, Err(e) if *e != CKR_BUFFER_TOO_SMALL && *e != CKR_SESSION_HANDLE_INVALID) {
        module::crypt_abort(h);
    }
}

unsafe fn crypt_init(
    h: CK_SESSION_HANDLE,
    encrypt: bool,
    m: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's mechanism.
        let m = unsafe { mechanism(m) }?;
        module::crypt_init(h, encrypt, m, key)
    })
}

unsafe fn crypt(
    h: CK_SESSION_HANDLE,
    encrypt: bool,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let r = (|| {
            // SAFETY: the caller's input and output buffers.
            let data = unsafe { bytes(data, data_len) }?;
            let room = unsafe { room(out, out_len) }?;
            let r = module::crypt_final(h, encrypt, data, room)?;
            // SAFETY: as above.
            unsafe { put_bytes(r, out, out_len) }
        })();
        end_crypt_on_error(h, &r);
        r
    })
}

unsafe fn crypt_update(
    h: CK_SESSION_HANDLE,
    encrypt: bool,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let r = (|| {
            if out_len.is_null() {
                return Err(CKR_ARGUMENTS_BAD);
            }
            // SAFETY: the caller's input buffer.
            let data = unsafe { bytes(data, data_len) }?;
            module::crypt_update(h, encrypt, data)?;
            // GCM outputs at the end: nothing now.
            // SAFETY: non-null, the caller's out parameter.
            unsafe { out_len.write(0) };
            Ok(())
        })();
        end_crypt_on_error(h, &r);
        r
    })
}

unsafe extern "C" fn c_encrypt_init(
    h: CK_SESSION_HANDLE,
    m: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's arguments, as C_EncryptInit takes them.
    unsafe { crypt_init(h, true, m, key) }
}

unsafe extern "C" fn c_decrypt_init(
    h: CK_SESSION_HANDLE,
    m: *mut CK_MECHANISM,
    key: CK_OBJECT_HANDLE,
) -> CK_RV {
    // SAFETY: the caller's arguments, as C_DecryptInit takes them.
    unsafe { crypt_init(h, false, m, key) }
}

unsafe extern "C" fn c_encrypt(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    dl: CK_ULONG,
    o: *mut CK_BYTE,
    ol: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as C_Encrypt takes them.
    unsafe { crypt(h, true, d, dl, o, ol) }
}

unsafe extern "C" fn c_decrypt(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    dl: CK_ULONG,
    o: *mut CK_BYTE,
    ol: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as C_Decrypt takes them.
    unsafe { crypt(h, false, d, dl, o, ol) }
}

unsafe extern "C" fn c_encrypt_update(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    dl: CK_ULONG,
    _o: *mut CK_BYTE,
    ol: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as C_EncryptUpdate takes them.
    unsafe { crypt_update(h, true, d, dl, ol) }
}

unsafe extern "C" fn c_decrypt_update(
    h: CK_SESSION_HANDLE,
    d: *mut CK_BYTE,
    dl: CK_ULONG,
    _o: *mut CK_BYTE,
    ol: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffers, as C_DecryptUpdate takes them.
    unsafe { crypt_update(h, false, d, dl, ol) }
}

unsafe extern "C" fn c_encrypt_final(
    h: CK_SESSION_HANDLE,
    o: *mut CK_BYTE,
    ol: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffer; no input.
    unsafe { crypt(h, true, std::ptr::null_mut(), 0, o, ol) }
}

unsafe extern "C" fn c_decrypt_final(
    h: CK_SESSION_HANDLE,
    o: *mut CK_BYTE,
    ol: *mut CK_ULONG,
) -> CK_RV {
    // SAFETY: the caller's buffer; no input.
    unsafe { crypt(h, false, std::ptr::null_mut(), 0, o, ol) }
}

// ---------------------------------------------------------------------------
// Digests (in the module: no key is involved).

unsafe extern "C" fn c_digest_init(h: CK_SESSION_HANDLE, m: *mut CK_MECHANISM) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's mechanism.
        let t = unsafe { mechanism_type(m) }?;
        module::digest_init(h, t)
    })
}

unsafe extern "C" fn c_digest(
    h: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let r = (|| {
            // SAFETY: the caller's input and output buffers.
            let data = unsafe { bytes(data, data_len) }?;
            let room = unsafe { room(out, out_len) }?;
            let r = module::digest_final(h, Some(data), room)?;
            // SAFETY: as above.
            unsafe { put_bytes(r, out, out_len) }
        })();
        end_digest_on_error(h, &r);
        r
    })
}

unsafe extern "C" fn c_digest_update(
    h: CK_SESSION_HANDLE,
    data: *mut CK_BYTE,
    data_len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's input buffer.
        let r = unsafe { bytes(data, data_len) }.and_then(|d| module::digest_update(h, d));
        end_digest_on_error(h, &r);
        r
    })
}

unsafe extern "C" fn c_digest_final(
    h: CK_SESSION_HANDLE,
    out: *mut CK_BYTE,
    out_len: *mut CK_ULONG,
) -> CK_RV {
    guard(|| {
        let r = (|| {
            // SAFETY: the caller's output buffer.
            let room = unsafe { room(out, out_len) }?;
            let r = module::digest_final(h, None, room)?;
            // SAFETY: as above.
            unsafe { put_bytes(r, out, out_len) }
        })();
        end_digest_on_error(h, &r);
        r
    })
}

/// A call that fails (other than a length query) ends the operation.
fn end_digest_on_error(h: CK_SESSION_HANDLE, r: &Result<(), Rv>) {
    if matches!(r, Err(e) if *e != CKR_BUFFER_TOO_SMALL && *e != CKR_SESSION_HANDLE_INVALID) {
        module::digest_abort(h);
    }
}

// ---------------------------------------------------------------------------
// Signatures.

/// A call that fails (other than a length query) ends the operation.
fn end_sign_on_error(h: CK_SESSION_HANDLE, r: &Result<(), Rv>) {
    if matches!(r, Err(e) if *e != CKR_BUFFER_TOO_SMALL && *e != CKR_SESSION_HANDLE_INVALID) {
        module::sign_abort(h);
    }
}

unsafe fn sign_init(h: CK_SESSION_HANDLE, verify: bool, m: *mut CK_MECHANISM, key: O) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's mechanism.
        let m = unsafe { mechanism(m) }?;
        module::sign_init(h, verify, m, key)
    })
}

unsafe extern "C" fn c_sign_init(h: H, m: M, key: O) -> CK_RV {
    // SAFETY: the caller's arguments, as C_SignInit takes them.
    unsafe { sign_init(h, false, m, key) }
}

unsafe extern "C" fn c_verify_init(h: H, m: M, key: O) -> CK_RV {
    // SAFETY: the caller's arguments, as C_VerifyInit takes them.
    unsafe { sign_init(h, true, m, key) }
}

unsafe fn sign_update(h: H, verify: bool, data: B, len: L) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's input buffer.
        let r = unsafe { bytes(data, len) }.and_then(|d| module::sign_update(h, verify, d));
        end_sign_on_error(h, &r);
        r
    })
}

unsafe extern "C" fn c_sign_update(h: H, data: B, len: L) -> CK_RV {
    // SAFETY: the caller's buffer, as C_SignUpdate takes it.
    unsafe { sign_update(h, false, data, len) }
}

unsafe extern "C" fn c_verify_update(h: H, data: B, len: L) -> CK_RV {
    // SAFETY: the caller's buffer, as C_VerifyUpdate takes it.
    unsafe { sign_update(h, true, data, len) }
}

unsafe fn sign(h: H, data: B, data_len: L, out: B, out_len: PL) -> CK_RV {
    guard(|| {
        let r = (|| {
            // SAFETY: the caller's input and output buffers.
            let data = unsafe { bytes(data, data_len) }?;
            let room = unsafe { room(out, out_len) }?;
            let r = module::sign_final(h, data, room)?;
            // SAFETY: as above.
            unsafe { put_bytes(r, out, out_len) }
        })();
        end_sign_on_error(h, &r);
        r
    })
}

unsafe extern "C" fn c_sign(h: H, data: B, data_len: L, out: B, out_len: PL) -> CK_RV {
    // SAFETY: the caller's buffers, as C_Sign takes them.
    unsafe { sign(h, data, data_len, out, out_len) }
}

unsafe extern "C" fn c_sign_final(h: H, out: B, out_len: PL) -> CK_RV {
    // SAFETY: the caller's buffer; no more input.
    unsafe { sign(h, std::ptr::null_mut(), 0, out, out_len) }
}

unsafe fn verify(h: H, data: B, data_len: L, sig: B, sig_len: L) -> CK_RV {
    guard(|| {
        let r = (|| {
            // SAFETY: the caller's data and signature.
            let data = unsafe { bytes(data, data_len) }?;
            let sig = unsafe { bytes(sig, sig_len) }?;
            module::verify_final(h, data, sig)
        })();
        end_sign_on_error(h, &r);
        r
    })
}

unsafe extern "C" fn c_verify(h: H, data: B, data_len: L, sig: B, sig_len: L) -> CK_RV {
    // SAFETY: the caller's buffers, as C_Verify takes them.
    unsafe { verify(h, data, data_len, sig, sig_len) }
}

unsafe extern "C" fn c_verify_final(h: H, sig: B, sig_len: L) -> CK_RV {
    // SAFETY: the caller's signature; no more input.
    unsafe { verify(h, std::ptr::null_mut(), 0, sig, sig_len) }
}

// ---------------------------------------------------------------------------
// Objects made and changed.

unsafe extern "C" fn c_generate_key(h: H, m: M, t: A, n: L, out: *mut O) -> CK_RV {
    guard(|| {
        if out.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller's mechanism and template.
        let m = unsafe { mechanism_type(m) }?;
        let t = unsafe { template_of(t, n) }?;
        let k = module::generate_key(h, m, &t)?;
        // SAFETY: the caller's out parameter (non-null).
        unsafe { put(out, k) }
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn c_generate_key_pair(
    h: H,
    m: M,
    pt: A,
    pn: L,
    st: A,
    sn: L,
    public: *mut O,
    private: *mut O,
) -> CK_RV {
    guard(|| {
        if public.is_null() || private.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller's mechanism and templates.
        let m = unsafe { mechanism_type(m) }?;
        let pt = unsafe { template_of(pt, pn) }?;
        let st = unsafe { template_of(st, sn) }?;
        let (a, b) = module::generate_key_pair(h, m, &pt, &st)?;
        // SAFETY: the caller's out parameters (non-null).
        unsafe { put(public, a) }?;
        unsafe { put(private, b) }
    })
}

unsafe extern "C" fn c_create_object(h: H, t: A, n: L, out: *mut O) -> CK_RV {
    guard(|| {
        if out.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller's template.
        let t = unsafe { template_of(t, n) }?;
        let o = module::create_object(h, &t)?;
        // SAFETY: the caller's out parameter (non-null).
        unsafe { put(out, o) }
    })
}

extern "C" fn c_destroy_object(h: H, o: O) -> CK_RV {
    guard(|| module::destroy_object(h, o))
}

unsafe extern "C" fn c_set_attribute_value(h: H, o: O, t: A, n: L) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's template.
        let t = unsafe { template_of(t, n) }?;
        module::set_attributes(h, o, &t)
    })
}

unsafe extern "C" fn c_wrap_key(h: H, m: M, wrapping: O, key: O, out: B, out_len: PL) -> CK_RV {
    guard(|| {
        // SAFETY: the caller's mechanism and output buffer.
        let m = unsafe { mechanism(m) }?;
        let room = unsafe { room(out, out_len) }?;
        let r = module::wrap_key(h, m.kind(), wrapping, key, room)?;
        // SAFETY: as above.
        unsafe { put_bytes(r, out, out_len) }
    })
}

#[allow(clippy::too_many_arguments)]
unsafe extern "C" fn c_unwrap_key(
    h: H,
    m: M,
    unwrapping: O,
    wrapped: B,
    wrapped_len: L,
    t: A,
    n: L,
    out: *mut O,
) -> CK_RV {
    guard(|| {
        if out.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        // SAFETY: the caller's mechanism, wrapped key and template.
        let m = unsafe { mechanism(m) }?;
        let wrapped = unsafe { bytes(wrapped, wrapped_len) }?;
        let t = unsafe { template_of(t, n) }?;
        let k = module::unwrap_key(h, m.kind(), unwrapping, wrapped, &t)?;
        // SAFETY: the caller's out parameter (non-null).
        unsafe { put(out, k) }
    })
}

// ---------------------------------------------------------------------------
// Random numbers.

extern "C" fn c_seed_random(_h: CK_SESSION_HANDLE, _seed: *mut CK_BYTE, _len: CK_ULONG) -> CK_RV {
    // The HSM's generator takes no seed from a client.
    guard(|| Err(CKR_RANDOM_SEED_NOT_SUPPORTED))
}

unsafe extern "C" fn c_generate_random(
    h: CK_SESSION_HANDLE,
    out: *mut CK_BYTE,
    len: CK_ULONG,
) -> CK_RV {
    guard(|| {
        if len == 0 {
            return module::session_info(h).map(|_| ());
        }
        if out.is_null() {
            return Err(CKR_ARGUMENTS_BAD);
        }
        let n = usize::try_from(len).map_err(|_| CKR_ARGUMENTS_BAD)?;
        // SAFETY: non-null and valid for `len` bytes by the caller's
        // contract; nothing else touches it during the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(out, n) };
        module::generate_random(h, buf)
    })
}

// ---------------------------------------------------------------------------
// Not (yet) supported: CKR_FUNCTION_NOT_SUPPORTED, with the exact C types.

macro_rules! unsupported {
    ($($name:ident($($t:ty),*);)*) => {
        $(
            extern "C" fn $name($(_: $t),*) -> CK_RV {
                CKR_FUNCTION_NOT_SUPPORTED
            }
        )*
    };
}

unsupported! {
    c_init_token(CK_SLOT_ID, U, L, U);
    c_init_pin(H, U, L);
    c_set_pin(H, U, L, U, L);
    c_get_operation_state(H, B, PL);
    c_set_operation_state(H, B, L, O, O);
    c_copy_object(H, O, A, L, *mut O);
    c_get_object_size(H, O, PL);
    c_digest_key(H, O);
    c_sign_recover_init(H, M, O);
    c_sign_recover(H, B, L, B, PL);
    c_verify_recover_init(H, M, O);
    c_verify_recover(H, B, L, B, PL);
    c_digest_encrypt_update(H, B, L, B, PL);
    c_decrypt_digest_update(H, B, L, B, PL);
    c_sign_encrypt_update(H, B, L, B, PL);
    c_decrypt_verify_update(H, B, L, B, PL);
    c_derive_key(H, M, O, A, L, *mut O);
    c_get_function_status(H);
    c_cancel_function(H);
    c_wait_for_slot_event(CK_FLAGS, *mut CK_SLOT_ID, V);
    c_login_user(H, CK_USER_TYPE, U, L, U, L);
    c_session_cancel(H, CK_FLAGS);
    c_message_encrypt_init(H, M, O);
    c_encrypt_message(H, V, L, B, L, B, L, B, PL);
    c_encrypt_message_begin(H, V, L, B, L);
    c_encrypt_message_next(H, V, L, B, L, B, PL, CK_FLAGS);
    c_message_encrypt_final(H);
    c_message_decrypt_init(H, M, O);
    c_decrypt_message(H, V, L, B, L, B, L, B, PL);
    c_decrypt_message_begin(H, V, L, B, L);
    c_decrypt_message_next(H, V, L, B, L, B, PL, CK_FLAGS);
    c_message_decrypt_final(H);
    c_message_sign_init(H, M, O);
    c_sign_message(H, V, L, B, L, B, PL);
    c_sign_message_begin(H, V, L);
    c_sign_message_next(H, V, L, B, L, B, PL);
    c_message_sign_final(H);
    c_message_verify_init(H, M, O);
    c_verify_message(H, V, L, B, L, B, L);
    c_verify_message_begin(H, V, L);
    c_verify_message_next(H, V, L, B, L, B, L);
    c_message_verify_final(H);
}

// ---------------------------------------------------------------------------
// The function lists.

macro_rules! v2_functions {
    ($ver:expr, $ty:ident { $($extra:tt)* }) => {
        $ty {
            version: $ver,
            C_Initialize: Some(c_initialize),
            C_Finalize: Some(c_finalize),
            C_GetInfo: Some(c_get_info),
            C_GetFunctionList: Some(c_get_function_list),
            C_GetSlotList: Some(c_get_slot_list),
            C_GetSlotInfo: Some(c_get_slot_info),
            C_GetTokenInfo: Some(c_get_token_info),
            C_GetMechanismList: Some(c_get_mechanism_list),
            C_GetMechanismInfo: Some(c_get_mechanism_info),
            C_InitToken: Some(c_init_token),
            C_InitPIN: Some(c_init_pin),
            C_SetPIN: Some(c_set_pin),
            C_OpenSession: Some(c_open_session),
            C_CloseSession: Some(c_close_session),
            C_CloseAllSessions: Some(c_close_all_sessions),
            C_GetSessionInfo: Some(c_get_session_info),
            C_GetOperationState: Some(c_get_operation_state),
            C_SetOperationState: Some(c_set_operation_state),
            C_Login: Some(c_login),
            C_Logout: Some(c_logout),
            C_CreateObject: Some(c_create_object),
            C_CopyObject: Some(c_copy_object),
            C_DestroyObject: Some(c_destroy_object),
            C_GetObjectSize: Some(c_get_object_size),
            C_GetAttributeValue: Some(c_get_attribute_value),
            C_SetAttributeValue: Some(c_set_attribute_value),
            C_FindObjectsInit: Some(c_find_objects_init),
            C_FindObjects: Some(c_find_objects),
            C_FindObjectsFinal: Some(c_find_objects_final),
            C_EncryptInit: Some(c_encrypt_init),
            C_Encrypt: Some(c_encrypt),
            C_EncryptUpdate: Some(c_encrypt_update),
            C_EncryptFinal: Some(c_encrypt_final),
            C_DecryptInit: Some(c_decrypt_init),
            C_Decrypt: Some(c_decrypt),
            C_DecryptUpdate: Some(c_decrypt_update),
            C_DecryptFinal: Some(c_decrypt_final),
            C_DigestInit: Some(c_digest_init),
            C_Digest: Some(c_digest),
            C_DigestUpdate: Some(c_digest_update),
            C_DigestKey: Some(c_digest_key),
            C_DigestFinal: Some(c_digest_final),
            C_SignInit: Some(c_sign_init),
            C_Sign: Some(c_sign),
            C_SignUpdate: Some(c_sign_update),
            C_SignFinal: Some(c_sign_final),
            C_SignRecoverInit: Some(c_sign_recover_init),
            C_SignRecover: Some(c_sign_recover),
            C_VerifyInit: Some(c_verify_init),
            C_Verify: Some(c_verify),
            C_VerifyUpdate: Some(c_verify_update),
            C_VerifyFinal: Some(c_verify_final),
            C_VerifyRecoverInit: Some(c_verify_recover_init),
            C_VerifyRecover: Some(c_verify_recover),
            C_DigestEncryptUpdate: Some(c_digest_encrypt_update),
            C_DecryptDigestUpdate: Some(c_decrypt_digest_update),
            C_SignEncryptUpdate: Some(c_sign_encrypt_update),
            C_DecryptVerifyUpdate: Some(c_decrypt_verify_update),
            C_GenerateKey: Some(c_generate_key),
            C_GenerateKeyPair: Some(c_generate_key_pair),
            C_WrapKey: Some(c_wrap_key),
            C_UnwrapKey: Some(c_unwrap_key),
            C_DeriveKey: Some(c_derive_key),
            C_SeedRandom: Some(c_seed_random),
            C_GenerateRandom: Some(c_generate_random),
            C_GetFunctionStatus: Some(c_get_function_status),
            C_CancelFunction: Some(c_cancel_function),
            C_WaitForSlotEvent: Some(c_wait_for_slot_event),
            $($extra)*
        }
    };
}

static FUNCTIONS: CK_FUNCTION_LIST = v2_functions!(version(2, 40), CK_FUNCTION_LIST {});

static FUNCTIONS_3_0: CK_FUNCTION_LIST_3_0 = v2_functions!(
    version(3, 0),
    CK_FUNCTION_LIST_3_0 {
        C_GetInterfaceList: Some(c_get_interface_list),
        C_GetInterface: Some(c_get_interface),
        C_LoginUser: Some(c_login_user),
        C_SessionCancel: Some(c_session_cancel),
        C_MessageEncryptInit: Some(c_message_encrypt_init),
        C_EncryptMessage: Some(c_encrypt_message),
        C_EncryptMessageBegin: Some(c_encrypt_message_begin),
        C_EncryptMessageNext: Some(c_encrypt_message_next),
        C_MessageEncryptFinal: Some(c_message_encrypt_final),
        C_MessageDecryptInit: Some(c_message_decrypt_init),
        C_DecryptMessage: Some(c_decrypt_message),
        C_DecryptMessageBegin: Some(c_decrypt_message_begin),
        C_DecryptMessageNext: Some(c_decrypt_message_next),
        C_MessageDecryptFinal: Some(c_message_decrypt_final),
        C_MessageSignInit: Some(c_message_sign_init),
        C_SignMessage: Some(c_sign_message),
        C_SignMessageBegin: Some(c_sign_message_begin),
        C_SignMessageNext: Some(c_sign_message_next),
        C_MessageSignFinal: Some(c_message_sign_final),
        C_MessageVerifyInit: Some(c_message_verify_init),
        C_VerifyMessage: Some(c_verify_message),
        C_VerifyMessageBegin: Some(c_verify_message_begin),
        C_VerifyMessageNext: Some(c_verify_message_next),
        C_MessageVerifyFinal: Some(c_message_verify_final),
    }
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fields_are_blank_padded_and_cut_at_a_character() {
        assert_eq!(&padded::<8>("tde"), b"tde     ");
        assert_eq!(&padded::<4>("abcdef"), b"abcd");
        // "é" is two bytes: a cut inside it drops it whole.
        assert_eq!(&padded::<4>("abcé"), b"abc ");
    }

    #[test]
    fn a_panic_becomes_a_general_error() {
        let prev = std::panic::take_hook();
        std::panic::set_hook(Box::new(|_| {}));
        let rv = guard(|| panic!("boom"));
        std::panic::set_hook(prev);
        assert_eq!(rv, CKR_GENERAL_ERROR);
        assert_eq!(guard(|| Err(CKR_SLOT_ID_INVALID)), CKR_SLOT_ID_INVALID);
    }
}
