//! Issue 14: `libtde_pkcs11.so` loaded by a real PKCS#11 client, OpenSC's
//! `pkcs11-tool`, against a real sidecar.

mod common;

use std::path::PathBuf;
use std::process::{Command, Output};

use common::{Env, add_alice, audit, count, pkcs11_module as module, skip};
use sha2::Digest as _;

fn tool(env: &Env, args: &[&str]) -> Output {
    let m = module();
    Command::new("pkcs11-tool")
        .arg("--module")
        .arg(&m)
        .args(args)
        .env("TDE_PKCS11_SOCKET", env.data_socket())
        .env_remove("TDE_PKCS11_CONFIG")
        .output()
        .expect("pkcs11-tool")
}

fn ok(env: &Env, args: &[&str]) -> String {
    let out = tool(env, args);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pkcs11-tool {args:?}: {text}");
    text
}

fn have_tool() -> bool {
    let there = Command::new("pkcs11-tool").arg("--help").output().is_ok();
    if !there {
        skip("pkcs11-tool (opensc) is not installed");
    }
    there
}

#[test]
fn pkcs11_tool_sees_the_token_its_mechanisms_and_random_bytes() {
    if !have_tool() {
        return;
    }
    let env = Env::with_operations("", r#""generate_random", "pkcs11""#);
    let daemon = env.sidecar_with_keys(&["pg-main"]);
    add_alice(&env, &[]);
    let store_id = env.status()["store_id"]
        .as_str()
        .expect("store id")
        .to_string();
    assert_eq!(store_id.len(), 32, "{store_id}");

    let info = ok(&env, &["--show-info"]);
    assert!(info.contains("Cryptoki version 3.0"), "{info}");
    assert!(info.contains("Manufacturer     tde"), "{info}");

    let slots = ok(&env, &["--list-slots"]);
    assert!(slots.contains("token label        : tde"), "{slots}");
    assert!(
        slots.contains(&format!("serial num         : {}", &store_id[..16])),
        "the token's serial is the store id: {slots}"
    );
    assert!(slots.contains("rng"), "CKF_RNG: {slots}");
    assert!(
        slots.contains("login required"),
        "keys are private: {slots}"
    );

    let mechs = ok(&env, &["--list-mechanisms"]);
    for m in ["SHA256", "SHA384", "SHA512"] {
        assert!(mechs.contains(&format!("{m}, digest")), "{m}: {mechs}");
    }

    // Digests in the module agree with sha2.
    let input = env.dir.path().join("in.bin");
    let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(&input, &data).expect("write");
    let hashed = env.dir.path().join("out.bin");
    ok(
        &env,
        &[
            "--hash",
            "-m",
            "SHA256",
            "-i",
            input.to_str().expect("utf8"),
            "-o",
            hashed.to_str().expect("utf8"),
        ],
    );
    assert_eq!(
        std::fs::read(&hashed).expect("digest"),
        sha2::Sha256::digest(&data).to_vec()
    );

    // Random bytes from the HSM, more than one request's worth, audited
    // with the calling program.
    let random = env.dir.path().join("random.bin");
    ok(
        &env,
        &[
            "--generate-random",
            "10000",
            "-o",
            random.to_str().expect("utf8"),
        ],
    );
    let bytes = std::fs::read(&random).expect("random");
    assert_eq!(bytes.len(), 10000);
    assert!(
        bytes.windows(16).any(|w| w != [0u8; 16]),
        "random bytes are not zeros"
    );
    let records = audit(&env.db());
    let from_tool: Vec<_> = records
        .iter()
        .filter(|r| r["op"] == "generate_random" && r["result"] == "ok")
        .collect();
    assert_eq!(from_tool.len(), 3, "4096 + 4096 + 1808 bytes");
    for r in &from_tool {
        let exe = r["actor"]["exe"].as_str().unwrap_or("");
        assert!(exe.ends_with("pkcs11-tool"), "the caller is named: {r}");
    }

    // A login with the operator's name and password as the PIN.
    let out = tool(
        &env,
        &["--login", "--pin", "alice:wrong", "--generate-random", "8"],
    );
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("CKR_PIN_INCORRECT"),
        "{text}"
    );
    ok(
        &env,
        &[
            "--login",
            "--pin",
            "alice:alice-password-1",
            "--generate-random",
            "8",
        ],
    );
    let records = audit(&env.db());
    assert_eq!(count(&records, "p11_login", "ok"), 1);
    assert_eq!(count(&records, "p11_login", "error"), 1);

    // A stopped sidecar is an absent token; it is found again when back.
    daemon.stop();
    let slots = ok(&env, &["--list-slots"]);
    assert!(slots.contains("(empty)"), "no token: {slots}");
    let out = tool(&env, &["--generate-random", "16"]);
    assert!(!out.status.success(), "no random bytes without a sidecar");
    let _daemon = env.serve();
    let slots = ok(&env, &["--list-slots"]);
    assert!(slots.contains("token label        : tde"), "back: {slots}");
}

/// The module's C ABI, called as a C client calls it: through
/// `C_GetFunctionList` of the loaded library.
mod c_abi {
    // This test is a C client of the module: every call is an FFI call.
    #![allow(unsafe_code)]

    use std::ptr::null_mut;

    use cryptoki_sys::*;

    /// The loaded module. A library is loaded once per process, so its
    /// state is shared by every test here: they take turns (the guard),
    /// each pointing the module at its own sidecar, and each leaves it
    /// finalized, also when it fails.
    pub struct Module {
        pub f: &'static CK_FUNCTION_LIST,
        _lib: libloading::Library,
        _turn: std::sync::MutexGuard<'static, ()>,
    }

    impl Drop for Module {
        fn drop(&mut self) {
            // SAFETY: C_Finalize with no argument; an error (not
            // initialized) is fine.
            let _ = unsafe { (self.f.C_Finalize.expect("C_Finalize"))(std::ptr::null_mut()) };
        }
    }

    static TURN: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// The module, for a sidecar on `socket`.
    pub fn load(socket: &std::path::Path) -> Module {
        let turn = TURN.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: only the test holding the turn touches these variables
        // and the module that reads them.
        unsafe { std::env::set_var("TDE_PKCS11_SOCKET", socket) };
        unsafe { std::env::remove_var("TDE_PKCS11_CONFIG") };
        // SAFETY: loading the module runs no initializer of its own.
        let lib = unsafe { libloading::Library::new(super::module()) }.expect("dlopen");
        let mut list: *mut CK_FUNCTION_LIST = null_mut();
        // SAFETY: the symbol has this type (PKCS#11 v3.0 section 5.4).
        let get: libloading::Symbol<'_, unsafe extern "C" fn(*mut *mut CK_FUNCTION_LIST) -> CK_RV> =
            unsafe { lib.get(b"C_GetFunctionList\0") }.expect("C_GetFunctionList");
        // SAFETY: a valid out pointer.
        assert_eq!(unsafe { get(&mut list) }, CKR_OK);
        // SAFETY: a null out pointer is refused, not written.
        assert_eq!(unsafe { get(null_mut()) }, CKR_ARGUMENTS_BAD);
        assert!(!list.is_null());
        // SAFETY: the list is static in the library, which `Module` keeps
        // loaded.
        let f = unsafe { &*list };
        Module {
            f,
            _lib: lib,
            _turn: turn,
        }
    }

    macro_rules! call {
        ($m:expr, $name:ident($($arg:expr),*)) => {
            // SAFETY: the test passes what each case says; the module
            // must cope with every one of them.
            unsafe { ($m.f.$name.expect(stringify!($name)))($($arg),*) }
        };
    }
    pub(crate) use call;
}

#[test]
fn the_c_abi_refuses_bad_calls_survives_seal_restart_threads_and_fork() {
    #![allow(unsafe_code)]
    use c_abi::call;
    use cryptoki_sys::*;
    use std::ptr::null_mut;

    let env = Env::new("");
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    let m = c_abi::load(&env.data_socket());

    // Before C_Initialize.
    let mut n: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_GetSlotList(0, null_mut(), &mut n)),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
    let mut info: CK_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(call!(m, C_GetInfo(&mut info)), CKR_CRYPTOKI_NOT_INITIALIZED);

    // C_Initialize's arguments.
    let mut args = CK_C_INITIALIZE_ARGS {
        CreateMutex: None,
        DestroyMutex: None,
        LockMutex: None,
        UnlockMutex: None,
        flags: CKF_OS_LOCKING_OK,
        pReserved: std::ptr::dangling_mut(),
    };
    let ptr =
        |a: &mut CK_C_INITIALIZE_ARGS| a as *mut CK_C_INITIALIZE_ARGS as *mut std::ffi::c_void;
    assert_eq!(
        call!(m, C_Initialize(ptr(&mut args))),
        CKR_ARGUMENTS_BAD,
        "pReserved set"
    );
    args.pReserved = null_mut();
    args.CreateMutex = Some(create_mutex);
    assert_eq!(
        call!(m, C_Initialize(ptr(&mut args))),
        CKR_ARGUMENTS_BAD,
        "one mutex function of four"
    );
    args.flags = 0;
    args.DestroyMutex = Some(mutex_op);
    args.LockMutex = Some(mutex_op);
    args.UnlockMutex = Some(mutex_op);
    assert_eq!(
        call!(m, C_Initialize(ptr(&mut args))),
        CKR_CANT_LOCK,
        "the application's own locks only"
    );
    args.flags = CKF_OS_LOCKING_OK;
    assert_eq!(
        call!(m, C_Initialize(ptr(&mut args))),
        CKR_OK,
        "OS locking is fine"
    );
    assert_eq!(
        call!(m, C_Initialize(ptr(&mut args))),
        CKR_CRYPTOKI_ALREADY_INITIALIZED
    );
    assert_eq!(call!(m, C_GetInfo(null_mut())), CKR_ARGUMENTS_BAD);
    assert_eq!(call!(m, C_GetInfo(&mut info)), CKR_OK);
    assert_eq!(
        (info.cryptokiVersion.major, info.cryptokiVersion.minor),
        (3, 0)
    );
    assert_eq!(&info.manufacturerID[..4], b"tde ");

    // Size queries.
    assert_eq!(
        call!(m, C_GetSlotList(0, null_mut(), null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_GetSlotList(0, null_mut(), &mut n)), CKR_OK);
    assert_eq!(n, 1);
    let mut slots = [99 as CK_SLOT_ID; 1];
    let mut zero: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_GetSlotList(0, slots.as_mut_ptr(), &mut zero)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(zero, 1, "the size comes back with CKR_BUFFER_TOO_SMALL");
    assert_eq!(
        call!(m, C_GetSlotList(1, slots.as_mut_ptr(), &mut n)),
        CKR_OK
    );
    assert_eq!(slots[0], 0);
    let mut slot_info: CK_SLOT_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(
        call!(m, C_GetSlotInfo(7, &mut slot_info)),
        CKR_SLOT_ID_INVALID
    );
    assert_eq!(call!(m, C_GetSlotInfo(0, null_mut())), CKR_ARGUMENTS_BAD);
    let mut mechs: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_GetMechanismList(0, null_mut(), &mut mechs)),
        CKR_OK
    );
    assert_eq!(mechs as usize, tde_pkcs11::module::MECHANISMS.len());
    let mut mi: CK_MECHANISM_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(
        call!(m, C_GetMechanismInfo(0, CKM_RSA_X_509, &mut mi)),
        CKR_MECHANISM_INVALID
    );

    // Sessions.
    let mut h: CK_SESSION_HANDLE = 0;
    assert_eq!(
        call!(m, C_OpenSession(0, 0, null_mut(), None, &mut h)),
        CKR_SESSION_PARALLEL_NOT_SUPPORTED
    );
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, null_mut())
        ),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h)
        ),
        CKR_OK
    );
    assert_eq!(
        call!(m, C_CloseSession(h + 1000)),
        CKR_SESSION_HANDLE_INVALID
    );
    let mut buf = [0u8; 64];
    assert_eq!(
        call!(m, C_GenerateRandom(h + 1000, buf.as_mut_ptr(), 16)),
        CKR_SESSION_HANDLE_INVALID
    );
    assert_eq!(
        call!(m, C_GenerateRandom(h, null_mut(), 16)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_GenerateRandom(h, buf.as_mut_ptr(), 64)), CKR_OK);
    assert_ne!(buf, [0u8; 64]);
    // Not implemented: said, not crashed.
    assert_eq!(call!(m, C_DigestKey(h, 1)), CKR_FUNCTION_NOT_SUPPORTED);
    assert_eq!(call!(m, C_SignInit(h, null_mut(), 1)), CKR_ARGUMENTS_BAD);

    // A digest: the length query, a buffer too small (the operation goes
    // on), then the digest; a second C_Digest has no operation.
    let mut mech = CK_MECHANISM {
        mechanism: CKM_SHA256,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    assert_eq!(call!(m, C_DigestInit(h, null_mut())), CKR_ARGUMENTS_BAD);
    assert_eq!(call!(m, C_DigestInit(h, &mut mech)), CKR_OK);
    assert_eq!(call!(m, C_DigestInit(h, &mut mech)), CKR_OPERATION_ACTIVE);
    let mut data = *b"abc";
    let mut len: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_Digest(h, data.as_mut_ptr(), 3, null_mut(), &mut len)),
        CKR_OK
    );
    assert_eq!(len, 32);
    len = 31;
    assert_eq!(
        call!(
            m,
            C_Digest(h, data.as_mut_ptr(), 3, buf.as_mut_ptr(), &mut len)
        ),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(len, 32);
    len = 64;
    assert_eq!(
        call!(
            m,
            C_Digest(h, data.as_mut_ptr(), 3, buf.as_mut_ptr(), &mut len)
        ),
        CKR_OK
    );
    assert_eq!((len, &buf[..4]), (32, &[0xba, 0x78, 0x16, 0xbf][..]));
    assert_eq!(
        call!(
            m,
            C_Digest(h, data.as_mut_ptr(), 3, buf.as_mut_ptr(), &mut len)
        ),
        CKR_OPERATION_NOT_INITIALIZED
    );
    mech.mechanism = CKM_AES_GCM;
    assert_eq!(call!(m, C_DigestInit(h, &mut mech)), CKR_MECHANISM_INVALID);

    // Sixteen threads at once, each with its own session.
    let f: &'static CK_FUNCTION_LIST = m.f;
    let threads: Vec<_> = (0..16)
        .map(|_| {
            std::thread::spawn(move || {
                let mut h: CK_SESSION_HANDLE = 0;
                let mut b = [0u8; 32];
                // SAFETY: valid pointers throughout.
                unsafe {
                    assert_eq!(
                        (f.C_OpenSession.expect("open"))(
                            0,
                            CKF_SERIAL_SESSION,
                            null_mut(),
                            None,
                            &mut h
                        ),
                        CKR_OK
                    );
                    for _ in 0..20 {
                        assert_eq!(
                            (f.C_GenerateRandom.expect("random"))(h, b.as_mut_ptr(), 32),
                            CKR_OK
                        );
                    }
                    assert_eq!((f.C_CloseSession.expect("close"))(h), CKR_OK);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a thread's calls failed");
    }

    // fork(): the child must initialize again, then works on its own.
    // SAFETY: the child calls only the module and _exit.
    let pid = unsafe { libc::fork() };
    assert!(pid >= 0, "fork");
    if pid == 0 {
        let mut n: CK_ULONG = 0;
        let mut b = [0u8; 8];
        let mut h2: CK_SESSION_HANDLE = 0;
        // SAFETY: valid pointers; _exit ends the child without running
        // the parent's destructors or test harness.
        unsafe {
            let code = if (f.C_GetSlotList.expect("l"))(0, null_mut(), &mut n)
                != CKR_CRYPTOKI_NOT_INITIALIZED
            {
                10
            } else if (f.C_GenerateRandom.expect("r"))(h, b.as_mut_ptr(), 8)
                != CKR_CRYPTOKI_NOT_INITIALIZED
            {
                11
            } else if (f.C_Initialize.expect("i"))(null_mut()) != CKR_OK {
                12
            } else if (f.C_OpenSession.expect("o"))(
                0,
                CKF_SERIAL_SESSION,
                null_mut(),
                None,
                &mut h2,
            ) != CKR_OK
            {
                13
            } else if (f.C_GenerateRandom.expect("r"))(h2, b.as_mut_ptr(), 8) != CKR_OK {
                14
            } else {
                0
            };
            libc::_exit(code);
        }
    }
    let mut status = 0;
    // SAFETY: waits for the child just made.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert!(libc::WIFEXITED(status), "the child crashed: {status}");
    assert_eq!(libc::WEXITSTATUS(status), 0, "the child's failing step");
    assert_eq!(
        call!(m, C_GenerateRandom(h, buf.as_mut_ptr(), 16)),
        CKR_OK,
        "the parent goes on"
    );

    // A sealed sidecar: a device error, and the same session works again
    // once it is unsealed.
    env.ok(&["seal"]);
    assert_eq!(
        call!(m, C_GenerateRandom(h, buf.as_mut_ptr(), 16)),
        CKR_DEVICE_ERROR
    );
    env.unseal(&shares[..3]);
    assert_eq!(call!(m, C_GenerateRandom(h, buf.as_mut_ptr(), 16)), CKR_OK);
    // A stopped one: the token is gone, then back, without C_Initialize.
    daemon.stop();
    assert_eq!(
        call!(m, C_GenerateRandom(h, buf.as_mut_ptr(), 16)),
        CKR_DEVICE_ERROR
    );
    let mut ti: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(call!(m, C_GetTokenInfo(0, &mut ti)), CKR_TOKEN_NOT_PRESENT);
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    assert_eq!(call!(m, C_GetTokenInfo(0, &mut ti)), CKR_OK);
    assert_eq!(call!(m, C_GenerateRandom(h, buf.as_mut_ptr(), 16)), CKR_OK);

    assert_eq!(
        call!(m, C_Finalize(std::ptr::dangling_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
    assert_eq!(
        call!(m, C_GenerateRandom(h, buf.as_mut_ptr(), 16)),
        CKR_CRYPTOKI_NOT_INITIALIZED
    );
}

// Mutex functions an application might pass: never called (the module
// refuses them or locks on its own).
extern "C" fn create_mutex(_: *mut *mut std::ffi::c_void) -> cryptoki_sys::CK_RV {
    cryptoki_sys::CKR_GENERAL_ERROR
}

extern "C" fn mutex_op(_: *mut std::ffi::c_void) -> cryptoki_sys::CK_RV {
    cryptoki_sys::CKR_GENERAL_ERROR
}

#[test]
fn c_login_is_an_operator_login_with_lockout_audited_with_the_caller() {
    #![allow(unsafe_code)]
    use c_abi::call;
    use cryptoki_sys::*;
    use std::ptr::null_mut;

    let env = Env::with_operations("", r#""generate_random", "pkcs11""#);
    let _daemon = env.sidecar_with_keys(&[]);
    add_alice(&env, &[]);
    env.ok_new_password(
        &["operator", "add", "mallory", "--role", "crypto_user"],
        "mallory-password-1",
    );
    let m = c_abi::load(&env.data_socket());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let (mut ro, mut rw) = (0, 0);
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut ro)
        ),
        CKR_OK
    );
    let flags = CKF_SERIAL_SESSION | CKF_RW_SESSION;
    assert_eq!(
        call!(m, C_OpenSession(0, flags, null_mut(), None, &mut rw)),
        CKR_OK
    );
    let mut ti: CK_TOKEN_INFO = unsafe { std::mem::zeroed() };
    assert_eq!(call!(m, C_GetTokenInfo(0, &mut ti)), CKR_OK);
    assert_ne!(ti.flags & CKF_USER_PIN_INITIALIZED, 0);
    let state = |h| {
        let mut si: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
        assert_eq!(call!(m, C_GetSessionInfo(h, &mut si)), CKR_OK);
        si.state
    };
    assert_eq!(state(ro), CKS_RO_PUBLIC_SESSION);
    let login = |h, who: CK_USER_TYPE, pin: &str| {
        let mut pin = pin.as_bytes().to_vec();
        call!(m, C_Login(h, who, pin.as_mut_ptr(), pin.len() as CK_ULONG))
    };

    // Bad input.
    assert_eq!(
        call!(m, C_Login(ro, CKU_USER, null_mut(), 4)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        login(ro, 7, "alice:alice-password-1"),
        CKR_USER_TYPE_INVALID
    );
    assert_eq!(login(ro, CKU_USER, "no colon"), CKR_PIN_INCORRECT);
    assert_eq!(
        login(ro + 100, CKU_USER, "alice:alice-password-1"),
        CKR_SESSION_HANDLE_INVALID
    );
    assert_eq!(call!(m, C_Logout(ro)), CKR_USER_NOT_LOGGED_IN);
    // A crypto officer is no CKU_USER, and CKU_SO with a read-only
    // session open is refused as the standard says.
    let officer = format!("admin:{}", common::PASSWORD);
    assert_eq!(login(ro, CKU_USER, &officer), CKR_PIN_INCORRECT);
    assert_eq!(login(rw, CKU_SO, &officer), CKR_SESSION_READ_ONLY_EXISTS);

    // A crypto user logs in: every session of the token is the user's.
    assert_eq!(login(ro, CKU_USER, "alice:alice-password-1"), CKR_OK);
    assert_eq!(state(ro), CKS_RO_USER_FUNCTIONS);
    assert_eq!(state(rw), CKS_RW_USER_FUNCTIONS);
    assert_eq!(
        login(rw, CKU_USER, "alice:alice-password-1"),
        CKR_USER_ALREADY_LOGGED_IN
    );
    assert_eq!(
        login(rw, CKU_SO, &officer),
        CKR_USER_ANOTHER_ALREADY_LOGGED_IN
    );
    assert_eq!(call!(m, C_Logout(rw)), CKR_OK);
    assert_eq!(state(ro), CKS_RO_PUBLIC_SESSION);

    // Wrong PINs count toward the operator's lockout; then even the right
    // one is refused, and an officer sees the lock.
    for _ in 0..4 {
        assert_eq!(login(ro, CKU_USER, "mallory:guess"), CKR_PIN_INCORRECT);
    }
    assert_eq!(
        login(ro, CKU_USER, "mallory:guess"),
        CKR_PIN_LOCKED,
        "the fifth locks"
    );
    assert_eq!(
        login(ro, CKU_USER, "mallory:mallory-password-1"),
        CKR_PIN_LOCKED
    );
    let ops = env.ok(&["operator", "list"]);
    let mallory = ops
        .as_array()
        .expect("operators")
        .iter()
        .find(|o| o["name"] == "mallory")
        .expect("mallory")
        .clone();
    assert_eq!(mallory["locked"], true, "{ops}");

    // Closing the last session logs out.
    assert_eq!(login(ro, CKU_USER, "alice:alice-password-1"), CKR_OK);
    assert_eq!(call!(m, C_CloseSession(rw)), CKR_OK);
    assert_eq!(state(ro), CKS_RO_USER_FUNCTIONS);
    assert_eq!(call!(m, C_CloseSession(ro)), CKR_OK);
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut ro)
        ),
        CKR_OK
    );
    assert_eq!(state(ro), CKS_RO_PUBLIC_SESSION);
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);

    // The audit log names who logged in, from which program, and never
    // holds a password.
    let records = audit(&env.db());
    let logins: Vec<_> = records.iter().filter(|r| r["op"] == "p11_login").collect();
    assert_eq!(
        logins.iter().filter(|r| r["result"] == "ok").count(),
        2,
        "alice twice"
    );
    assert_eq!(
        logins.iter().filter(|r| r["result"] == "error").count(),
        7,
        "the officer as CKU_USER, five guesses, the locked right one"
    );
    for r in &logins {
        assert_eq!(r["socket"], "data", "{r}");
        assert!(r["actor"]["exe"].as_str().is_some(), "{r}");
    }
    let text = serde_json::to_string(&records).expect("json");
    for secret in [
        "alice-password-1",
        "mallory-password-1",
        "guess",
        common::PASSWORD,
    ] {
        assert!(!text.contains(secret), "{secret} in the audit log");
    }
    assert!(
        logins
            .iter()
            .any(|r| r["actor"]["operator"] == "alice" && r["actor"]["role"] == "crypto_user"),
        "{logins:?}"
    );
    assert_eq!(
        records.iter().filter(|r| r["op"] == "p11_logout").count(),
        2,
        "C_Logout, and the last session closed"
    );
}

#[test]
fn a_client_without_pkcs11_in_its_policy_cannot_log_in() {
    #![allow(unsafe_code)]
    use c_abi::call;
    use cryptoki_sys::*;
    use std::ptr::null_mut;

    let env = Env::new("");
    let _daemon = env.sidecar_with_keys(&[]);
    add_alice(&env, &[]);
    let m = c_abi::load(&env.data_socket());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let mut h = 0;
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h)
        ),
        CKR_OK
    );
    let mut pin = b"alice:alice-password-1".to_vec();
    assert_eq!(
        call!(
            m,
            C_Login(h, CKU_USER, pin.as_mut_ptr(), pin.len() as CK_ULONG)
        ),
        CKR_FUNCTION_REJECTED
    );
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
    let records = audit(&env.db());
    let refused = records
        .iter()
        .find(|r| r["op"] == "p11_login")
        .expect("the refusal is audited");
    assert_eq!(refused["error_code"], "PERMISSION_DENIED", "{refused}");
}

#[test]
fn master_keys_are_private_sensitive_aes_objects_seen_by_whom_they_are_shared_with() {
    #![allow(unsafe_code)]
    use c_abi::call;
    use cryptoki_sys::*;
    use std::ptr::null_mut;

    let env = Env::with_operations("", r#""pkcs11""#);
    // The runner's policy names app-* and pg*; secret-y is outside it.
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    for k in ["pg-main", "pg-other", "app-x", "secret-y"] {
        env.ok(&["key", "create", k]);
    }
    add_alice(&env, &["pg-main", "secret-y"]);

    let m = c_abi::load(&env.data_socket());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let mut h = 0;
    let flags = CKF_SERIAL_SESSION | CKF_RW_SESSION;
    assert_eq!(
        call!(m, C_OpenSession(0, flags, null_mut(), None, &mut h)),
        CKR_OK
    );
    let find = |template: &mut [CK_ATTRIBUTE]| -> Vec<CK_OBJECT_HANDLE> {
        assert_eq!(
            call!(
                m,
                C_FindObjectsInit(h, template.as_mut_ptr(), template.len() as CK_ULONG)
            ),
            CKR_OK
        );
        let mut out = Vec::new();
        loop {
            let mut batch = [0 as CK_OBJECT_HANDLE; 2];
            let mut n: CK_ULONG = 0;
            assert_eq!(
                call!(m, C_FindObjects(h, batch.as_mut_ptr(), 2, &mut n)),
                CKR_OK
            );
            if n == 0 {
                break;
            }
            out.extend_from_slice(&batch[..n as usize]);
        }
        assert_eq!(call!(m, C_FindObjectsFinal(h)), CKR_OK);
        out
    };
    let label = |o: CK_OBJECT_HANDLE| -> String {
        let mut a = [CK_ATTRIBUTE {
            type_: CKA_LABEL,
            pValue: null_mut(),
            ulValueLen: 0,
        }];
        assert_eq!(
            call!(m, C_GetAttributeValue(h, o, a.as_mut_ptr(), 1)),
            CKR_OK
        );
        let mut buf = vec![0u8; a[0].ulValueLen as usize];
        a[0].pValue = buf.as_mut_ptr() as *mut _;
        assert_eq!(
            call!(m, C_GetAttributeValue(h, o, a.as_mut_ptr(), 1)),
            CKR_OK
        );
        String::from_utf8(buf).expect("utf8")
    };
    let login = |who: CK_USER_TYPE, pin: &str| {
        let mut pin = pin.as_bytes().to_vec();
        call!(m, C_Login(h, who, pin.as_mut_ptr(), pin.len() as CK_ULONG))
    };

    // Private objects: nothing before a login.
    assert_eq!(find(&mut []), Vec::<CK_OBJECT_HANDLE>::new());
    assert_eq!(
        call!(m, C_FindObjects(h, null_mut(), 1, null_mut())),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(m, C_FindObjectsFinal(h)),
        CKR_OPERATION_NOT_INITIALIZED
    );

    // A crypto user: the keys shared with it that the policy names.
    assert_eq!(login(CKU_USER, "alice:alice-password-1"), CKR_OK);
    let found = find(&mut []);
    assert_eq!(
        found.len(),
        1,
        "pg-main only (secret-y is outside the policy)"
    );
    let key = found[0];
    assert_eq!(label(key), "pg-main");

    // Its attributes: an AES-256 secret key, sensitive, never extractable.
    let mut class: CK_ULONG = 0;
    let mut key_type: CK_ULONG = 0;
    let mut value = [0u8; 32];
    let mut extractable: CK_BBOOL = 1;
    let mut short = [0u8; 3];
    let mut attrs = [
        CK_ATTRIBUTE {
            type_: CKA_CLASS,
            pValue: &mut class as *mut _ as *mut _,
            ulValueLen: 8,
        },
        CK_ATTRIBUTE {
            type_: CKA_KEY_TYPE,
            pValue: &mut key_type as *mut _ as *mut _,
            ulValueLen: 8,
        },
        CK_ATTRIBUTE {
            type_: CKA_VALUE,
            pValue: value.as_mut_ptr() as *mut _,
            ulValueLen: 32,
        },
        CK_ATTRIBUTE {
            type_: CKA_EXTRACTABLE,
            pValue: &mut extractable as *mut _ as *mut _,
            ulValueLen: 1,
        },
        CK_ATTRIBUTE {
            type_: CKA_MODULUS,
            pValue: null_mut(),
            ulValueLen: 0,
        },
    ];
    let rv = call!(m, C_GetAttributeValue(h, key, attrs.as_mut_ptr(), 5));
    assert!(
        rv == CKR_ATTRIBUTE_SENSITIVE || rv == CKR_ATTRIBUTE_TYPE_INVALID,
        "{rv:#x}"
    );
    assert_eq!((class, key_type, extractable), (CKO_SECRET_KEY, CKK_AES, 0));
    assert_eq!(attrs[2].ulValueLen, !0, "CKA_VALUE is sensitive");
    assert_eq!(value, [0u8; 32], "and not written");
    assert_eq!(attrs[4].ulValueLen, !0, "no CKA_MODULUS on an AES key");
    let mut small = [CK_ATTRIBUTE {
        type_: CKA_LABEL,
        pValue: short.as_mut_ptr() as *mut _,
        ulValueLen: 3,
    }];
    assert_eq!(
        call!(m, C_GetAttributeValue(h, key, small.as_mut_ptr(), 1)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(small[0].ulValueLen, !0);

    // Searches by attribute: label, id, class.
    let mut id = vec![0u8; 16];
    let mut a = [CK_ATTRIBUTE {
        type_: CKA_ID,
        pValue: id.as_mut_ptr() as *mut _,
        ulValueLen: 16,
    }];
    assert_eq!(
        call!(m, C_GetAttributeValue(h, key, a.as_mut_ptr(), 1)),
        CKR_OK
    );
    assert_eq!(find(&mut a), vec![key], "by CKA_ID");
    let mut name = b"pg-main".to_vec();
    let mut by_label = [CK_ATTRIBUTE {
        type_: CKA_LABEL,
        pValue: name.as_mut_ptr() as *mut _,
        ulValueLen: 7,
    }];
    assert_eq!(find(&mut by_label), vec![key], "by label");
    let mut other = b"pg-other".to_vec();
    let mut by_other = [CK_ATTRIBUTE {
        type_: CKA_LABEL,
        pValue: other.as_mut_ptr() as *mut _,
        ulValueLen: 8,
    }];
    assert!(find(&mut by_other).is_empty(), "not shared with alice");
    let mut cls = CKO_PRIVATE_KEY;
    let mut by_class = [CK_ATTRIBUTE {
        type_: CKA_CLASS,
        pValue: &mut cls as *mut _ as *mut _,
        ulValueLen: 8,
    }];
    assert!(find(&mut by_class).is_empty());

    // After the logout the handle shows nothing.
    assert_eq!(call!(m, C_Logout(h)), CKR_OK);
    assert_eq!(
        call!(m, C_GetAttributeValue(h, key, a.as_mut_ptr(), 1)),
        CKR_OBJECT_HANDLE_INVALID
    );

    // An officer sees every key the policy names; the same key keeps its
    // handle.
    assert_eq!(
        login(CKU_SO, &format!("admin:{}", common::PASSWORD)),
        CKR_OK
    );
    let mut labels: Vec<String> = find(&mut []).into_iter().map(label).collect();
    labels.sort();
    assert_eq!(labels, ["app-x", "pg-main", "pg-other"]);
    assert_eq!(find(&mut by_label), vec![key]);

    // A restarted sidecar has forgotten the login: the application is
    // told, and logs in again without restarting.
    daemon.stop();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    assert_eq!(
        call!(m, C_FindObjectsInit(h, null_mut(), 0)),
        CKR_USER_NOT_LOGGED_IN
    );
    assert_eq!(login(CKU_USER, "alice:alice-password-1"), CKR_OK);
    assert_eq!(find(&mut by_label), vec![key], "the same handle");
    drop(m);

    // OpenSC's view of the same token.
    if !have_tool() {
        return;
    }
    let listed = ok(
        &env,
        &[
            "--login",
            "--pin",
            "alice:alice-password-1",
            "--list-objects",
        ],
    );
    assert!(
        listed.contains("Secret Key Object; AES length 32"),
        "{listed}"
    );
    assert!(listed.contains("label:      pg-main"), "{listed}");
    assert!(!listed.contains("pg-other"), "{listed}");
    let records = audit(&env.db());
    assert!(
        records
            .iter()
            .any(|r| r["op"] == "p11_objects" && r["actor"]["operator"] == "alice"),
        "listing is audited"
    );
}

#[test]
fn aes_gcm_under_a_master_key_encrypts_table_keys_and_refuses_a_tampered_tag() {
    #![allow(unsafe_code)]
    use c_abi::call;
    use cryptoki_sys::*;
    use std::ptr::null_mut;

    let env = Env::with_operations("", r#""pkcs11""#);
    let _daemon = env.sidecar_with_keys(&["pg-main"]);
    add_alice(&env, &["pg-main"]);
    let m = c_abi::load(&env.data_socket());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let mut h = 0;
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h)
        ),
        CKR_OK
    );
    let mut pin = b"alice:alice-password-1".to_vec();
    assert_eq!(
        call!(
            m,
            C_Login(h, CKU_USER, pin.as_mut_ptr(), pin.len() as CK_ULONG)
        ),
        CKR_OK
    );
    let mut label = b"pg-main".to_vec();
    let mut t = [CK_ATTRIBUTE {
        type_: CKA_LABEL,
        pValue: label.as_mut_ptr() as *mut _,
        ulValueLen: 7,
    }];
    assert_eq!(call!(m, C_FindObjectsInit(h, t.as_mut_ptr(), 1)), CKR_OK);
    let (mut key, mut n) = (0, 0);
    assert_eq!(call!(m, C_FindObjects(h, &mut key, 1, &mut n)), CKR_OK);
    assert_eq!(call!(m, C_FindObjectsFinal(h)), CKR_OK);
    assert_eq!(n, 1);

    // Both parameter layouts: the header's (with ulIvBits) and v2.40's
    // text (without), which SunPKCS11 sends.
    #[repr(C)]
    struct NoIvBits {
        iv: *mut u8,
        iv_len: CK_ULONG,
        aad: *mut u8,
        aad_len: CK_ULONG,
        tag_bits: CK_ULONG,
    }
    let mut iv = [7u8; 12];
    let mut aad = b"table 42".to_vec();
    let mut p48 = CK_GCM_PARAMS {
        pIv: iv.as_mut_ptr(),
        ulIvLen: 12,
        ulIvBits: 96,
        pAAD: aad.as_mut_ptr(),
        ulAADLen: aad.len() as CK_ULONG,
        ulTagBits: 128,
    };
    let mut p40 = NoIvBits {
        iv: iv.as_mut_ptr(),
        iv_len: 12,
        aad: aad.as_mut_ptr(),
        aad_len: aad.len() as CK_ULONG,
        tag_bits: 128,
    };
    let mech48 = |p: &mut CK_GCM_PARAMS| CK_MECHANISM {
        mechanism: CKM_AES_GCM,
        pParameter: p as *mut _ as *mut _,
        ulParameterLen: std::mem::size_of::<CK_GCM_PARAMS>() as CK_ULONG,
    };
    let mut m48 = mech48(&mut p48);
    let mut m40 = CK_MECHANISM {
        mechanism: CKM_AES_GCM,
        pParameter: &mut p40 as *mut _ as *mut _,
        ulParameterLen: 40,
    };
    let encrypt = |mech: &mut CK_MECHANISM, pt: &[u8]| -> Vec<u8> {
        assert_eq!(call!(m, C_EncryptInit(h, mech, key)), CKR_OK);
        let mut pt = pt.to_vec();
        let mut len: CK_ULONG = 0;
        assert_eq!(
            call!(
                m,
                C_Encrypt(
                    h,
                    pt.as_mut_ptr(),
                    pt.len() as CK_ULONG,
                    null_mut(),
                    &mut len
                )
            ),
            CKR_OK
        );
        assert_eq!(len as usize, pt.len() + 16);
        let mut out = vec![0u8; len as usize];
        assert_eq!(
            call!(
                m,
                C_Encrypt(
                    h,
                    pt.as_mut_ptr(),
                    pt.len() as CK_ULONG,
                    out.as_mut_ptr(),
                    &mut len
                )
            ),
            CKR_OK
        );
        out
    };
    let decrypt = |mech: &mut CK_MECHANISM, ct: &[u8]| -> Result<Vec<u8>, CK_RV> {
        assert_eq!(call!(m, C_DecryptInit(h, mech, key)), CKR_OK);
        let mut ct = ct.to_vec();
        let mut len = ct.len() as CK_ULONG;
        let mut out = vec![0u8; ct.len()];
        match call!(
            m,
            C_Decrypt(
                h,
                ct.as_mut_ptr(),
                ct.len() as CK_ULONG,
                out.as_mut_ptr(),
                &mut len
            )
        ) {
            CKR_OK => {
                out.truncate(len as usize);
                Ok(out)
            }
            rv => Err(rv),
        }
    };

    // 64 table keys, each 32 bytes, under the master key.
    let table_keys: Vec<Vec<u8>> = (0..64u8).map(|i| vec![0xA0 ^ i; 32]).collect();
    let sealed: Vec<Vec<u8>> = table_keys.iter().map(|k| encrypt(&mut m48, k)).collect();
    for (k, c) in table_keys.iter().zip(&sealed) {
        assert_eq!(c.len(), 48);
        assert!(!c.windows(32).any(|w| w == k.as_slice()));
        assert_eq!(
            decrypt(&mut m40, c).as_ref(),
            Ok(k),
            "the other layout decrypts"
        );
    }

    // Multi-part gives the same ciphertext (same key, IV and AAD).
    assert_eq!(call!(m, C_EncryptInit(h, &mut m48, key)), CKR_OK);
    let mut part = table_keys[0].clone();
    let mut none: CK_ULONG = 99;
    assert_eq!(
        call!(
            m,
            C_EncryptUpdate(h, part.as_mut_ptr(), 16, null_mut(), &mut none)
        ),
        CKR_OK
    );
    assert_eq!(none, 0, "GCM answers at the end");
    assert_eq!(
        call!(
            m,
            C_EncryptUpdate(h, part[16..].as_mut_ptr(), 16, null_mut(), &mut none)
        ),
        CKR_OK
    );
    let mut out = vec![0u8; 48];
    let mut len: CK_ULONG = 10;
    assert_eq!(
        call!(m, C_EncryptFinal(h, out.as_mut_ptr(), &mut len)),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(len, 48, "the size, and the operation goes on");
    len = 48;
    assert_eq!(
        call!(m, C_EncryptFinal(h, out.as_mut_ptr(), &mut len)),
        CKR_OK
    );
    assert_eq!(out, sealed[0]);

    // A tampered tag, ciphertext or AAD: CKR_ENCRYPTED_DATA_INVALID (Java's
    // AEADBadTagException), nothing released, the operation over.
    let mut bad = sealed[1].clone();
    bad[47] ^= 1;
    assert_eq!(decrypt(&mut m48, &bad), Err(CKR_ENCRYPTED_DATA_INVALID));
    let mut junk = [0u8; 48];
    let mut jl: CK_ULONG = 48;
    assert_eq!(
        call!(
            m,
            C_Decrypt(h, junk.as_mut_ptr(), 48, junk.as_mut_ptr(), &mut jl)
        ),
        CKR_OPERATION_NOT_INITIALIZED
    );
    bad = sealed[1].clone();
    bad[0] ^= 1;
    assert_eq!(decrypt(&mut m48, &bad), Err(CKR_ENCRYPTED_DATA_INVALID));
    let mut other_aad = b"table 43".to_vec();
    let mut p_other = CK_GCM_PARAMS {
        pAAD: other_aad.as_mut_ptr(),
        ..p48
    };
    let mut m_other = mech48(&mut p_other);
    assert_eq!(
        decrypt(&mut m_other, &sealed[1]),
        Err(CKR_ENCRYPTED_DATA_INVALID)
    );
    assert_eq!(
        decrypt(&mut m48, &sealed[1][..10]),
        Err(CKR_ENCRYPTED_DATA_LEN_RANGE)
    );

    // Parameters the module does not take.
    let mut p16 = CK_GCM_PARAMS { ulIvLen: 16, ..p48 };
    assert_eq!(
        call!(m, C_EncryptInit(h, &mut mech48(&mut p16), key)),
        CKR_MECHANISM_PARAM_INVALID
    );
    let mut p96 = CK_GCM_PARAMS {
        ulTagBits: 96,
        ..p48
    };
    assert_eq!(
        call!(m, C_EncryptInit(h, &mut mech48(&mut p96), key)),
        CKR_MECHANISM_PARAM_INVALID
    );
    let mut cbc = CK_MECHANISM {
        mechanism: CKM_AES_CBC_PAD,
        pParameter: iv.as_mut_ptr() as *mut _,
        ulParameterLen: 16,
    };
    assert_eq!(
        call!(m, C_EncryptInit(h, &mut cbc, key)),
        CKR_MECHANISM_INVALID
    );
    assert_eq!(
        call!(m, C_EncryptInit(h, null_mut(), key)),
        CKR_ARGUMENTS_BAD
    );
    assert_eq!(
        call!(m, C_EncryptInit(h, &mut m48, key + 1000)),
        CKR_KEY_HANDLE_INVALID
    );

    // After a rotation the old ciphertexts still decrypt, new ones are
    // under the new version.
    env.ok(&["key", "rotate", "pg-main"]);
    assert_eq!(decrypt(&mut m48, &sealed[2]).as_ref(), Ok(&table_keys[2]));
    assert_ne!(encrypt(&mut m48, &table_keys[2]), sealed[2]);

    // Logged out: no key.
    assert_eq!(call!(m, C_Logout(h)), CKR_OK);
    assert_eq!(
        call!(m, C_EncryptInit(h, &mut m48, key)),
        CKR_KEY_HANDLE_INVALID
    );
    drop(m);

    // Every call is audited with the key, the operator and the program;
    // no table key is in the store or the log.
    let records = audit(&env.db());
    let enc: Vec<_> = records
        .iter()
        .filter(|r| r["op"] == "p11_encrypt")
        .collect();
    assert_eq!(enc.len(), 64 + 1 + 1, "{}", enc.len());
    assert!(enc.iter().all(|r| r["key"] == "pg-main"
        && r["actor"]["operator"] == "alice"
        && r["actor"]["exe"].as_str().is_some()));
    assert_eq!(
        count(&records, "p11_decrypt", "error"),
        3,
        "the tag, the ciphertext and the AAD changed"
    );
    let mut files = vec![std::fs::read(env.db()).expect("db")];
    if let Ok(b) = std::fs::read(env.db().with_file_name("tde.db-wal")) {
        files.push(b);
    }
    if let Ok(b) = std::fs::read(env.log()) {
        files.push(b);
    }
    for k in &table_keys {
        for f in &files {
            assert!(
                !f.windows(32).any(|w| w == k.as_slice()),
                "a table key on disk"
            );
        }
    }
}

/// Compiles `examples/java/<class>.java` and runs it with Java's own
/// PKCS#11 provider configured for the module (`p11.cfg`) and alice's PIN
/// before `args`: its output, or `None` without a JDK.
fn java(env: &Env, class: &str, args: &[&str]) -> Option<String> {
    let javac = Command::new("javac").arg("-version").output();
    if !javac.is_ok_and(|o| o.status.success()) {
        skip("javac (default-jdk-headless) is not installed");
        return None;
    }
    let classes = env.dir.path().join("classes");
    let src = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(format!("examples/java/{class}.java"));
    let out = Command::new("javac")
        .arg("-d")
        .arg(&classes)
        .arg(&src)
        .output()
        .expect("javac");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let cfg = env.dir.path().join("p11.cfg");
    std::fs::write(
        &cfg,
        format!("name = tde\nlibrary = {}\nslot = 0\n", module().display()),
    )
    .expect("cfg");
    let out = Command::new("java")
        .arg("-cp")
        .arg(&classes)
        .arg(class)
        .arg(&cfg)
        .arg("alice:alice-password-1")
        .args(args)
        .env("TDE_PKCS11_SOCKET", env.data_socket())
        .env_remove("TDE_PKCS11_CONFIG")
        .output()
        .expect("java");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    Some(text)
}

/// Must-show 1, its AES part: Java's own PKCS#11 provider, unchanged
/// (`examples/java/TdeGcm.java`), with a token key.
#[test]
fn java_sunpkcs11_encrypts_with_a_token_key_and_throws_on_a_bad_tag() {
    let env = Env::with_operations("", r#""pkcs11""#);
    let _daemon = env.sidecar_with_keys(&["pg-main"]);
    add_alice(&env, &["pg-main"]);
    let Some(text) = java(&env, "TdeGcm", &["pg-main"]) else {
        return;
    };
    for line in [
        "aliases: [pg-main]",
        "key: AES",
        "sealed: 48 bytes",
        "opened: true",
        "tampered: AEADBadTagException",
    ] {
        assert!(text.contains(line), "{line:?} missing: {text}");
    }
    let records = audit(&env.db());
    let java: Vec<_> = records
        .iter()
        .filter(|r| r["op"] == "p11_encrypt" || r["op"] == "p11_decrypt")
        .collect();
    let ops: Vec<String> = java
        .iter()
        .map(|r| format!("{} {}", r["op"], r["result"]))
        .collect();
    // (SunPKCS11 encrypts once more on its own, so the encryptions are
    // not counted exactly.)
    assert_eq!(count(&records, "p11_decrypt", "ok"), 1, "{ops:?}");
    assert_eq!(count(&records, "p11_decrypt", "error"), 1, "{ops:?}");
    assert!(count(&records, "p11_encrypt", "ok") >= 1, "{ops:?}");
    assert_eq!(count(&records, "p11_encrypt", "error"), 0, "{ops:?}");
    assert!(
        java.iter().all(|r| r["actor"]["exe"]
            .as_str()
            .is_some_and(|e| e.contains("java"))),
        "the JVM is named: {java:?}"
    );
}

/// `openssl` with `args`, which must succeed: its output.
fn openssl(args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .expect("openssl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "openssl {args:?}: {text}");
    text
}

#[test]
fn pkcs11_tool_makes_key_pairs_signs_verifies_and_encrypts_in_the_token() {
    if !have_tool() {
        return;
    }
    let env = Env::with_operations("", r#""generate_random", "pkcs11""#);
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    env.ok(&["key", "create", "pg-main"]);
    add_alice(&env, &["pg-main"]);
    let dir = env.dir.path();
    let path = |n: &str| dir.join(n).to_str().expect("utf8").to_string();
    let user = |args: &[&str]| as_alice(&env, args);
    let made = user(&[
        "--keypairgen",
        "--key-type",
        "rsa:2048",
        "--label",
        "tls-rsa",
        "--id",
        "01",
    ]);
    assert!(made.contains("Public Key Object; RSA 2048 bits"), "{made}");
    assert!(made.contains("never extractable"), "{made}");
    let made = user(&[
        "--keypairgen",
        "--key-type",
        "EC:prime256v1",
        "--label",
        "tls-ec",
        "--id",
        "02",
    ]);
    assert!(made.contains("EC_PARAMS:  06082a8648ce3d030107"), "{made}");
    // Secret keys are always sensitive: asked for otherwise, refused.
    let out = tool(
        &env,
        &[
            "--login",
            "--pin",
            "alice:alice-password-1",
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "aes",
            "--id",
            "03",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("CKR_ATTRIBUTE_VALUE_INVALID"),
        "{out:?}"
    );
    user(&[
        "--keygen",
        "--key-type",
        "AES:32",
        "--label",
        "aes",
        "--id",
        "03",
        "--sensitive",
    ]);
    let list = user(&["--list-objects"]);
    for want in [
        "label:      tls-rsa",
        "label:      tls-ec",
        "label:      aes",
        "label:      pg-main",
    ] {
        assert!(list.contains(want), "{want}: {list}");
    }

    // `tde pkcs11 list` shows the same, through the module's own code: to
    // alice her shared master key and her objects, to the officer every
    // master key and every token object.
    let pw = path("alice.password");
    std::fs::write(&pw, "alice-password-1").expect("write");
    let v = env.ok(&[
        "pkcs11",
        "list",
        "--user",
        "--operator",
        "alice",
        "--password-file",
        &pw,
    ]);
    let shown = |v: &serde_json::Value| -> Vec<String> {
        v[0]["objects"]
            .as_array()
            .unwrap_or_else(|| panic!("no objects: {v}"))
            .iter()
            .map(|o| {
                format!(
                    "{} {} {}",
                    o["class"].as_str().unwrap_or_default(),
                    o["key_type"].as_str().unwrap_or_default(),
                    o["label"].as_str().unwrap_or_default()
                )
            })
            .collect()
    };
    let mine = shown(&v);
    for want in [
        "secret_key AES-256 pg-main",
        "private_key RSA-2048 tls-rsa",
        "public_key RSA-2048 tls-rsa",
        "private_key EC P-256 tls-ec",
        "public_key EC P-256 tls-ec",
        "secret_key AES-256 aes",
    ] {
        assert!(mine.contains(&want.to_string()), "{want}: {mine:?}");
    }
    assert_eq!(v[0]["present"], true);
    let officer = shown(&env.ok(&["pkcs11", "list"]));
    assert_eq!(officer.len(), mine.len(), "{officer:?}");
    let tokens = env.ok(&["pkcs11", "list", "--no-login"]);
    assert_eq!(tokens[0]["objects"].as_array().map(Vec::len), Some(0));

    // Sign in the token; verify in the token and, with the public key
    // read out of it, in OpenSSL.
    let data = path("to-sign");
    std::fs::write(&data, b"the data to sign").expect("write");
    for (id, mech, format) in [
        ("01", "SHA256-RSA-PKCS", None),
        ("01", "SHA256-RSA-PKCS-PSS", None),
        ("02", "ECDSA-SHA256", Some("openssl")),
    ] {
        let sig = path(&format!("sig-{mech}"));
        let mut args = vec!["--sign", "--id", id, "-m", mech, "-i", &data, "-o", &sig];
        if let Some(f) = format {
            args.extend(["--signature-format", f]);
        }
        user(&args);
        let mut args = vec![
            "--verify",
            "--id",
            id,
            "-m",
            mech,
            "-i",
            &data,
            "--signature-file",
            &sig,
        ];
        if let Some(f) = format {
            args.extend(["--signature-format", f]);
        }
        let v = user(&args);
        assert!(v.contains("Signature is valid"), "{mech}: {v}");
        let der = path(&format!("pub-{id}.der"));
        user(&["--read-object", "--type", "pubkey", "--id", id, "-o", &der]);
        let pem = path(&format!("pub-{id}.pem"));
        openssl(&[
            "pkey", "-pubin", "-inform", "DER", "-in", &der, "-out", &pem,
        ]);
        let mut args = vec!["dgst", "-sha256", "-verify", &pem, "-signature", &sig];
        if mech.ends_with("PSS") {
            args.extend([
                "-sigopt",
                "rsa_padding_mode:pss",
                "-sigopt",
                "rsa_pss_saltlen:digest",
            ]);
        }
        args.push(&data);
        let v = openssl(&args);
        assert!(v.contains("Verified OK"), "{mech}: {v}");
        // A changed byte does not verify.
        let mut bytes = std::fs::read(&sig).expect("sig");
        let n = bytes.len();
        bytes[n / 2] ^= 1;
        std::fs::write(&sig, bytes).expect("write");
        let mut args = vec![
            "--login",
            "--pin",
            "alice:alice-password-1",
            "--verify",
            "--id",
            id,
            "-m",
            mech,
            "-i",
            &data,
            "--signature-file",
            &sig,
        ];
        if let Some(f) = format {
            args.extend(["--signature-format", f]);
        }
        let out = tool(&env, &args);
        let text = String::from_utf8_lossy(&out.stdout).to_string()
            + &String::from_utf8_lossy(&out.stderr);
        assert!(
            text.contains("Invalid signature") || text.contains("CKR_SIGNATURE_INVALID"),
            "{mech}: {text}"
        );
    }

    // AES-CBC-PAD with the token's AES key, both ways.
    let secret: Vec<u8> = (0..100u8).collect();
    std::fs::write(path("plain"), &secret).expect("write");
    let iv = "000102030405060708090a0b0c0d0e0f";
    user(&[
        "--encrypt",
        "--id",
        "03",
        "-m",
        "AES-CBC-PAD",
        "--iv",
        iv,
        "-i",
        &path("plain"),
        "-o",
        &path("enc"),
    ]);
    let enc = std::fs::read(path("enc")).expect("enc");
    assert_eq!(enc.len(), 112);
    assert_ne!(&enc[..16], &secret[..16]);
    user(&[
        "--decrypt",
        "--id",
        "03",
        "-m",
        "AES-CBC-PAD",
        "--iv",
        iv,
        "-i",
        &path("enc"),
        "-o",
        &path("dec"),
    ]);
    assert_eq!(std::fs::read(path("dec")).expect("dec"), secret);

    // Objects persist: after a restart of the sidecar they are all there.
    daemon.stop();
    let _daemon = env.serve();
    env.unseal(&shares[..3]);
    let list = user(&["--list-objects"]);
    assert!(list.contains("label:      tls-ec"), "{list}");
    // Destroyed, gone.
    user(&["--delete-object", "--type", "secrkey", "--id", "03"]);
    let list = user(&["--list-objects"]);
    assert!(!list.contains("label:      aes\n"), "{list}");

    // OpenSC's own test of the token: random, digests, RSA signatures
    // (CKM_RSA_PKCS over a DigestInfo) and OAEP decryption with a label.
    let t = user(&["--test"]);
    assert!(t.contains("RSA-PKCS: OK"), "{t}");
    assert!(t.contains("No errors"), "{t}");
}

/// An OpenSSL configuration that loads the pkcs11 engine
/// (libengine-pkcs11-openssl) with this module and `pin`.
fn engine_config(env: &Env, pin: &str) -> Option<PathBuf> {
    let engine = [
        "/usr/lib/x86_64-linux-gnu/engines-3/pkcs11.so",
        "/usr/lib/aarch64-linux-gnu/engines-3/pkcs11.so",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.exists());
    let Some(engine) = engine else {
        skip("the OpenSSL pkcs11 engine (libengine-pkcs11-openssl) is not installed");
        return None;
    };
    let conf = env.dir.path().join("openssl.cnf");
    std::fs::write(
        &conf,
        format!(
            "openssl_conf = openssl_init\n\
             [openssl_init]\nengines = engine_section\n\
             [engine_section]\npkcs11 = pkcs11_section\n\
             [pkcs11_section]\nengine_id = pkcs11\ndynamic_path = {}\nMODULE_PATH = {}\nPIN = {pin}\ninit = 0\n",
            engine.display(),
            module().display()
        ),
    )
    .expect("write openssl.cnf");
    Some(conf)
}

/// `openssl` with the engine's configuration, against this sidecar.
fn openssl_engine(env: &Env, conf: &std::path::Path) -> Command {
    let mut c = Command::new("openssl");
    c.env("OPENSSL_CONF", conf)
        .env("TDE_PKCS11_SOCKET", env.data_socket())
        .env_remove("TDE_PKCS11_CONFIG");
    c
}

/// A TCP port nobody listens on now.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// `pkcs11-tool` logged in as alice.
fn as_alice(env: &Env, args: &[&str]) -> String {
    let mut a = vec!["--login", "--pin", "alice:alice-password-1"];
    a.extend_from_slice(args);
    ok(env, &a)
}

/// Alice's key pair `label` (`key_type` as pkcs11-tool names it, CKA_ID
/// `id`) made in the token, with a self-signed certificate for `cn`,
/// signed in the token through the OpenSSL engine and stored in the token
/// beside the key (same id and label): the certificate's PEM file.
fn token_key_with_cert(
    env: &Env,
    conf: &std::path::Path,
    label: &str,
    key_type: &str,
    id: &str,
    cn: &str,
) -> PathBuf {
    as_alice(
        env,
        &[
            "--keypairgen",
            "--key-type",
            key_type,
            "--label",
            label,
            "--id",
            id,
        ],
    );
    let cert = env.dir.path().join(format!("{label}.pem"));
    let out = openssl_engine(env, conf)
        .args([
            "req", "-new", "-x509", "-days", "30", "-engine", "pkcs11", "-keyform", "engine",
        ])
        .args(["-key", &format!("pkcs11:object={label};type=private")])
        .args([
            "-subj",
            &format!("/CN={cn}"),
            "-addext",
            &format!("subjectAltName=DNS:{cn}"),
        ])
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl req");
    assert!(
        out.status.success(),
        "req {label}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let der = env.dir.path().join(format!("{label}.der"));
    let (pem, der_s) = (cert.to_str().expect("utf8"), der.to_str().expect("utf8"));
    openssl(&["x509", "-in", pem, "-outform", "DER", "-out", der_s]);
    as_alice(
        env,
        &[
            "--write-object",
            der_s,
            "--type",
            "cert",
            "--id",
            id,
            "--label",
            label,
        ],
    );
    cert
}

#[test]
fn openssl_serves_tls_with_rsa_and_ec_keys_that_stay_in_the_token() {
    if !have_tool() {
        return;
    }
    let env = Env::with_operations("", r#""generate_random", "pkcs11""#);
    let _daemon = env.sidecar_with_keys(&[]);
    add_alice(&env, &[]);
    let Some(conf) = engine_config(&env, "alice:alice-password-1") else {
        return;
    };
    let dir = env.dir.path().to_path_buf();
    for (kind, key_type, id) in [("rsa", "rsa:2048", "11"), ("ec", "EC:prime256v1", "12")] {
        let label = format!("tls-{kind}");
        let uri = format!("pkcs11:object={label};type=private");
        let cert = token_key_with_cert(&env, &conf, &label, key_type, id, "localhost");

        // TLS 1.2 and 1.3 as OpenSSL chooses (RSA-PSS, ECDSA), and for RSA
        // also PKCS#1 v1.5 (CKM_RSA_PKCS over a DigestInfo).
        let mut runs = vec![("-tls1_2", None), ("-tls1_3", None)];
        if kind == "rsa" {
            runs.push(("-tls1_2", Some("RSA+SHA256")));
        }
        for (version, sigalgs) in runs {
            let port = free_port();
            let mut server = openssl_engine(&env, &conf)
                .args([
                    "s_server", "-engine", "pkcs11", "-keyform", "engine", "-key", &uri,
                ])
                .arg("-cert")
                .arg(&cert)
                .args(["-accept", &format!("127.0.0.1:{port}"), "-www", version])
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .expect("s_server");
            let started = std::time::Instant::now();
            let text = loop {
                let client = Command::new("openssl")
                    .args([
                        "s_client",
                        "-connect",
                        &format!("127.0.0.1:{port}"),
                        "-servername",
                        "localhost",
                    ])
                    .arg("-CAfile")
                    .arg(&cert)
                    .args([
                        "-verify_hostname",
                        "localhost",
                        "-verify_return_error",
                        "-brief",
                        version,
                    ])
                    .args(sigalgs.map(|a| ["-sigalgs", a]).into_iter().flatten())
                    .stdin(std::process::Stdio::null())
                    .output()
                    .expect("s_client");
                let text = format!(
                    "{}{}",
                    String::from_utf8_lossy(&client.stdout),
                    String::from_utf8_lossy(&client.stderr)
                );
                if client.status.success() || started.elapsed() > std::time::Duration::from_secs(20)
                {
                    break text;
                }
                std::thread::sleep(std::time::Duration::from_millis(200));
            };
            let _ = server.kill();
            let served = server.wait_with_output().expect("s_server output");
            assert!(
                text.contains("Verification: OK"),
                "{kind} {version}: {text}\nserver: {}{}",
                String::from_utf8_lossy(&served.stdout),
                String::from_utf8_lossy(&served.stderr)
            );
            let want = if version == "-tls1_3" {
                "TLSv1.3"
            } else {
                "TLSv1.2"
            };
            assert!(
                text.contains(&format!("Protocol version: {want}")),
                "{text}"
            );
            let sig = match (kind, sigalgs) {
                ("ec", _) => "Signature type: ECDSA",
                (_, Some(_)) => "Signature type: RSA\n",
                _ => "Signature type: RSA-PSS",
            };
            assert!(text.contains(sig), "{kind} {version} {sigalgs:?}: {text}");
        }
    }

    // The private keys exist nowhere on disk: no PEM key file, and no file
    // holds a key's public part in the clear (a PKCS#8 file, or a key in
    // the store or a log unencrypted, would).
    assert!(common::pg::files_containing(&dir, b"PRIVATE KEY").is_empty());
    for kind in ["rsa", "ec"] {
        let cert = dir.join(format!("tls-{kind}.pem"));
        let spki = Command::new("sh")
            .arg("-c")
            .arg(format!(
                "openssl x509 -in {} -noout -pubkey | openssl pkey -pubin -outform DER",
                cert.display()
            ))
            .output()
            .expect("spki");
        assert!(spki.status.success());
        // The last 64 bytes: inside the modulus (RSA) or the point (EC).
        let tail = &spki.stdout[spki.stdout.len() - 64..];
        let found: Vec<_> = common::pg::files_containing(&dir, tail)
            .into_iter()
            .filter(|p| p.extension().is_none_or(|e| e != "pem" && e != "der"))
            .collect();
        assert!(found.is_empty(), "{kind} key material in {found:?}");
    }
    // Every signature is audited with the process that asked.
    let records = audit(&env.db());
    let by_openssl = records
        .iter()
        .filter(|r| {
            r["op"] == "p11_sign"
                && r["result"] == "ok"
                && r["actor"]["exe"]
                    .as_str()
                    .is_some_and(|e| e.ends_with("/openssl"))
        })
        .count();
    assert!(
        by_openssl >= 7,
        "{by_openssl} signatures by openssl audited"
    );
}

/// Must-show 1: `examples/java/TdeSign.java`, unchanged, signs with a key
/// pair generated in the token (RSA, SHA256withRSA; EC, SHA256withECDSA)
/// through SunPKCS11's KeyStore, and the JDK verifies the signature with
/// the certificate's public key outside the HSM. The same program's AES
/// part runs with an AES key made in the token.
#[test]
fn java_sunpkcs11_signs_with_token_keys_verified_outside_the_hsm() {
    if !have_tool() {
        return;
    }
    let env = Env::with_operations("", r#""generate_random", "pkcs11""#);
    let _daemon = env.sidecar_with_keys(&[]);
    add_alice(&env, &[]);
    let Some(conf) = engine_config(&env, "alice:alice-password-1") else {
        return;
    };
    for (label, key_type, id) in [
        ("signer", "rsa:3072", "21"),
        ("ec-signer", "EC:secp384r1", "22"),
    ] {
        token_key_with_cert(&env, &conf, label, key_type, id, label);
    }
    let user = |args: &[&str]| as_alice(&env, args);
    user(&[
        "--keygen",
        "--key-type",
        "AES:32",
        "--label",
        "app-aes",
        "--id",
        "23",
        "--sensitive",
    ]);

    for (alias, alg, bytes, verifier) in [
        ("signer", "SHA256withRSA", 384, "SunRsaSign"),
        ("ec-signer", "SHA256withECDSA", 0, "SunEC"),
    ] {
        let Some(text) = java(&env, "TdeSign", &[alias, alg]) else {
            return;
        };
        for line in [
            format!("certificate: CN={alias}"),
            format!("verified by {verifier}: true"),
            "changed data verified: false".to_string(),
        ] {
            assert!(text.contains(&line), "{alias}: {line:?} missing: {text}");
        }
        assert!(text.contains("aliases: ["), "{text}");
        if bytes > 0 {
            assert!(
                text.contains(&format!("signature: {bytes} bytes by SunPKCS11")),
                "{text}"
            );
        }
    }
    let text = java(&env, "TdeGcm", &["app-aes"]).expect("java ran above");
    for line in [
        "key: AES",
        "sealed: 48 bytes",
        "opened: true",
        "tampered: AEADBadTagException",
    ] {
        assert!(text.contains(line), "{line:?} missing: {text}");
    }
    let records = audit(&env.db());
    let by_java = records
        .iter()
        .filter(|r| {
            r["op"] == "p11_sign"
                && r["result"] == "ok"
                && r["actor"]["exe"]
                    .as_str()
                    .is_some_and(|e| e.contains("java"))
        })
        .count();
    assert_eq!(by_java, 2, "one signature per key, by the JVM");
}

/// Must-show 5 for token keys, through the C ABI: signatures from 16
/// threads at once, the PKCS#11 buffer rules, bad handles and keys,
/// session objects ending with their session, wrap and unwrap, and a
/// second crypto user who cannot reach the first one's objects.
#[test]
fn token_keys_through_the_c_abi_threads_buffers_bad_handles_and_another_user() {
    #![allow(unsafe_code)]
    use c_abi::call;
    use cryptoki_sys::*;
    use std::ptr::null_mut;

    let env = Env::with_operations("", r#""generate_random", "pkcs11""#);
    let _daemon = env.sidecar_with_keys(&[]);
    add_alice(&env, &[]);
    env.ok_new_password(
        &["operator", "add", "bob", "--role", "crypto_user"],
        "bob-password-1",
    );
    let m = c_abi::load(&env.data_socket());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let rw = CKF_SERIAL_SESSION | CKF_RW_SESSION;
    let mut h: CK_SESSION_HANDLE = 0;
    assert_eq!(
        call!(m, C_OpenSession(0, rw, null_mut(), None, &mut h)),
        CKR_OK
    );
    let mut pin = *b"alice:alice-password-1";
    assert_eq!(
        call!(
            m,
            C_Login(h, CKU_USER, pin.as_mut_ptr(), pin.len() as CK_ULONG)
        ),
        CKR_OK
    );
    // CK_ATTRIBUTE over a value the test keeps alive.
    fn attr<T>(t: CK_ATTRIBUTE_TYPE, v: &mut T) -> CK_ATTRIBUTE {
        CK_ATTRIBUTE {
            type_: t,
            pValue: v as *mut T as *mut _,
            ulValueLen: std::mem::size_of::<T>() as CK_ULONG,
        }
    }
    let mut yes: CK_BBOOL = 1;
    let mut p256 = [0x06u8, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x03, 0x01, 0x07];
    let mut pub_t = [attr(CKA_EC_PARAMS, &mut p256), attr(CKA_VERIFY, &mut yes)];
    let mut yes2: CK_BBOOL = 1;
    let mut priv_t = [attr(CKA_SIGN, &mut yes2)];
    let mut pair_gen = CK_MECHANISM {
        mechanism: CKM_EC_KEY_PAIR_GEN,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    let (mut public, mut private) = (0, 0);
    assert_eq!(
        call!(
            m,
            C_GenerateKeyPair(
                h,
                &mut pair_gen,
                pub_t.as_mut_ptr(),
                2,
                priv_t.as_mut_ptr(),
                1,
                &mut public,
                &mut private
            )
        ),
        CKR_OK
    );
    let mut ecdsa = CK_MECHANISM {
        mechanism: CKM_ECDSA_SHA256,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    let mut data = *b"sign me";
    // The PKCS#11 buffer rules: a length query, a buffer too small (the
    // operation goes on), then the signature.
    assert_eq!(call!(m, C_SignInit(h, &mut ecdsa, private)), CKR_OK);
    let mut sig = [0u8; 128];
    let mut len: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_Sign(h, data.as_mut_ptr(), 7, null_mut(), &mut len)),
        CKR_OK
    );
    assert_eq!(len, 64);
    len = 10;
    assert_eq!(
        call!(
            m,
            C_Sign(h, data.as_mut_ptr(), 7, sig.as_mut_ptr(), &mut len)
        ),
        CKR_BUFFER_TOO_SMALL
    );
    assert_eq!(len, 64);
    len = 128;
    assert_eq!(
        call!(
            m,
            C_Sign(h, data.as_mut_ptr(), 7, sig.as_mut_ptr(), &mut len)
        ),
        CKR_OK
    );
    assert_eq!(len, 64);
    assert_eq!(
        call!(
            m,
            C_Sign(h, data.as_mut_ptr(), 7, sig.as_mut_ptr(), &mut len)
        ),
        CKR_OPERATION_NOT_INITIALIZED,
        "a signature ends the operation"
    );
    // Verify: good, changed, wrong length.
    assert_eq!(call!(m, C_VerifyInit(h, &mut ecdsa, public)), CKR_OK);
    assert_eq!(
        call!(m, C_Verify(h, data.as_mut_ptr(), 7, sig.as_mut_ptr(), 64)),
        CKR_OK
    );
    sig[5] ^= 1;
    assert_eq!(call!(m, C_VerifyInit(h, &mut ecdsa, public)), CKR_OK);
    assert_eq!(
        call!(m, C_Verify(h, data.as_mut_ptr(), 7, sig.as_mut_ptr(), 64)),
        CKR_SIGNATURE_INVALID
    );
    assert_eq!(call!(m, C_VerifyInit(h, &mut ecdsa, public)), CKR_OK);
    assert_eq!(
        call!(m, C_Verify(h, data.as_mut_ptr(), 7, sig.as_mut_ptr(), 63)),
        CKR_SIGNATURE_LEN_RANGE
    );
    // Bad handles, wrong keys, wrong mechanisms.
    assert_eq!(
        call!(
            m,
            C_Sign(h + 99, data.as_mut_ptr(), 7, sig.as_mut_ptr(), &mut len)
        ),
        CKR_SESSION_HANDLE_INVALID
    );
    assert_eq!(
        call!(m, C_SignInit(h, &mut ecdsa, 0xdead)),
        CKR_KEY_HANDLE_INVALID
    );
    assert_eq!(
        call!(m, C_SignInit(h, &mut ecdsa, public)),
        CKR_KEY_FUNCTION_NOT_PERMITTED
    );
    let mut rsa = CK_MECHANISM {
        mechanism: CKM_SHA256_RSA_PKCS,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    assert_eq!(
        call!(m, C_SignInit(h, &mut rsa, private)),
        CKR_KEY_TYPE_INCONSISTENT
    );
    // Secrets stay secret: CKA_VALUE of the private key, sensitive; the
    // public point, readable.
    let mut out = [0u8; 128];
    let mut a = [CK_ATTRIBUTE {
        type_: CKA_VALUE,
        pValue: out.as_mut_ptr() as *mut _,
        ulValueLen: 128,
    }];
    assert_eq!(
        call!(m, C_GetAttributeValue(h, private, a.as_mut_ptr(), 1)),
        CKR_ATTRIBUTE_SENSITIVE
    );
    a[0].type_ = CKA_EC_POINT;
    a[0].ulValueLen = 128;
    assert_eq!(
        call!(m, C_GetAttributeValue(h, public, a.as_mut_ptr(), 1)),
        CKR_OK
    );
    assert_eq!(a[0].ulValueLen, 67);

    // Sixteen threads sign at once, each in its own session.
    let f: &'static CK_FUNCTION_LIST = m.f;
    let threads: Vec<_> = (0..16)
        .map(|i| {
            std::thread::spawn(move || {
                let mut s: CK_SESSION_HANDLE = 0;
                let mut mech = CK_MECHANISM {
                    mechanism: CKM_ECDSA_SHA256,
                    pParameter: null_mut(),
                    ulParameterLen: 0,
                };
                // SAFETY: valid pointers throughout.
                unsafe {
                    assert_eq!(
                        (f.C_OpenSession.expect("open"))(
                            0,
                            CKF_SERIAL_SESSION,
                            null_mut(),
                            None,
                            &mut s
                        ),
                        CKR_OK
                    );
                    for j in 0..10u8 {
                        let mut d = [i as u8, j];
                        let mut sig = [0u8; 64];
                        let mut len: CK_ULONG = 64;
                        assert_eq!((f.C_SignInit.expect("si"))(s, &mut mech, private), CKR_OK);
                        assert_eq!(
                            (f.C_Sign.expect("s"))(
                                s,
                                d.as_mut_ptr(),
                                2,
                                sig.as_mut_ptr(),
                                &mut len
                            ),
                            CKR_OK
                        );
                        assert_eq!((f.C_VerifyInit.expect("vi"))(s, &mut mech, public), CKR_OK);
                        assert_eq!(
                            (f.C_Verify.expect("v"))(s, d.as_mut_ptr(), 2, sig.as_mut_ptr(), 64),
                            CKR_OK
                        );
                    }
                    assert_eq!((f.C_CloseSession.expect("close"))(s), CKR_OK);
                }
            })
        })
        .collect();
    for t in threads {
        t.join().expect("a thread's signature failed");
    }

    // AES: a token key needs a read-write session; a key's value never
    // comes in; wrap and unwrap give back the same key.
    let mut ro: CK_SESSION_HANDLE = 0;
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut ro)
        ),
        CKR_OK
    );
    let mut len32: CK_ULONG = 32;
    let mut token: CK_BBOOL = 1;
    let mut t = [attr(CKA_VALUE_LEN, &mut len32), attr(CKA_TOKEN, &mut token)];
    let mut keygen = CK_MECHANISM {
        mechanism: CKM_AES_KEY_GEN,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    let mut kek = 0;
    assert_eq!(
        call!(
            m,
            C_GenerateKey(ro, &mut keygen, t.as_mut_ptr(), 2, &mut kek)
        ),
        CKR_SESSION_READ_ONLY
    );
    assert_eq!(
        call!(
            m,
            C_GenerateKey(h, &mut keygen, t.as_mut_ptr(), 2, &mut kek)
        ),
        CKR_OK
    );
    let mut class: CK_ULONG = CKO_SECRET_KEY;
    let mut value = [0x11u8; 32];
    let mut c = [attr(CKA_CLASS, &mut class), attr(CKA_VALUE, &mut value)];
    let mut made = 0;
    assert_eq!(
        call!(m, C_CreateObject(h, c.as_mut_ptr(), 2, &mut made)),
        CKR_TEMPLATE_INCONSISTENT
    );
    let mut ext: CK_BBOOL = 1;
    let mut et = [
        attr(CKA_VALUE_LEN, &mut len32),
        attr(CKA_EXTRACTABLE, &mut ext),
    ];
    let mut target = 0;
    assert_eq!(
        call!(
            m,
            C_GenerateKey(h, &mut keygen, et.as_mut_ptr(), 2, &mut target)
        ),
        CKR_OK
    );
    let mut kw = CK_MECHANISM {
        mechanism: CKM_AES_KEY_WRAP_PAD,
        pParameter: null_mut(),
        ulParameterLen: 0,
    };
    let mut wrapped = [0u8; 64];
    let mut wlen: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_WrapKey(h, &mut kw, kek, kek, null_mut(), &mut wlen)),
        CKR_KEY_UNEXTRACTABLE
    );
    assert_eq!(
        call!(m, C_WrapKey(h, &mut kw, kek, target, null_mut(), &mut wlen)),
        CKR_OK
    );
    assert_eq!(wlen, 40);
    assert_eq!(
        call!(
            m,
            C_WrapKey(h, &mut kw, kek, target, wrapped.as_mut_ptr(), &mut wlen)
        ),
        CKR_OK
    );
    let mut back = 0;
    let mut no_t: [CK_ATTRIBUTE; 0] = [];
    assert_eq!(
        call!(
            m,
            C_UnwrapKey(
                h,
                &mut kw,
                kek,
                wrapped.as_mut_ptr(),
                wlen,
                no_t.as_mut_ptr(),
                0,
                &mut back
            )
        ),
        CKR_OK
    );
    wrapped[3] ^= 1;
    let mut bad = 0;
    assert_eq!(
        call!(
            m,
            C_UnwrapKey(
                h,
                &mut kw,
                kek,
                wrapped.as_mut_ptr(),
                wlen,
                no_t.as_mut_ptr(),
                0,
                &mut bad
            )
        ),
        CKR_WRAPPED_KEY_INVALID
    );
    // The unwrapped key is the wrapped one: both encrypt alike.
    let crypt = |key: CK_OBJECT_HANDLE| -> Vec<u8> {
        let mut iv = [9u8; 16];
        let mut cbc = CK_MECHANISM {
            mechanism: CKM_AES_CBC_PAD,
            pParameter: iv.as_mut_ptr() as *mut _,
            ulParameterLen: 16,
        };
        let mut plain = [5u8; 20];
        let mut out = [0u8; 64];
        let mut n: CK_ULONG = 64;
        assert_eq!(call!(m, C_EncryptInit(h, &mut cbc, key)), CKR_OK);
        assert_eq!(
            call!(
                m,
                C_Encrypt(h, plain.as_mut_ptr(), 20, out.as_mut_ptr(), &mut n)
            ),
            CKR_OK
        );
        out[..n as usize].to_vec()
    };
    let (a1, a2) = (crypt(target), crypt(back));
    assert_eq!(a1.len(), 32);
    assert_eq!(a1, a2);

    // A session object ends with the session that made it.
    let mut other: CK_SESSION_HANDLE = 0;
    assert_eq!(
        call!(m, C_OpenSession(0, rw, null_mut(), None, &mut other)),
        CKR_OK
    );
    let mut short_lived = 0;
    let mut t1 = [attr(CKA_VALUE_LEN, &mut len32)];
    assert_eq!(
        call!(
            m,
            C_GenerateKey(other, &mut keygen, t1.as_mut_ptr(), 1, &mut short_lived)
        ),
        CKR_OK
    );
    assert_eq!(call!(m, C_CloseSession(other)), CKR_OK);
    let mut iv = [9u8; 16];
    let mut cbc = CK_MECHANISM {
        mechanism: CKM_AES_CBC_PAD,
        pParameter: iv.as_mut_ptr() as *mut _,
        ulParameterLen: 16,
    };
    assert_eq!(
        call!(m, C_EncryptInit(h, &mut cbc, short_lived)),
        CKR_KEY_HANDLE_INVALID
    );

    // C_SetAttributeValue: a new label, found by it; other attributes
    // stay as they are.
    let mut new_label = *b"renamed-kek";
    let mut by_label = [CK_ATTRIBUTE {
        type_: CKA_LABEL,
        pValue: new_label.as_mut_ptr() as *mut _,
        ulValueLen: new_label.len() as CK_ULONG,
    }];
    assert_eq!(
        call!(m, C_SetAttributeValue(h, kek, by_label.as_mut_ptr(), 1)),
        CKR_OK
    );
    assert_eq!(
        call!(m, C_FindObjectsInit(h, by_label.as_mut_ptr(), 1)),
        CKR_OK
    );
    let mut hits = [0 as CK_OBJECT_HANDLE; 4];
    let mut nhits: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_FindObjects(h, hits.as_mut_ptr(), 4, &mut nhits)),
        CKR_OK
    );
    assert_eq!(&hits[..nhits as usize], &[kek]);
    assert_eq!(call!(m, C_FindObjectsFinal(h)), CKR_OK);
    let mut no: CK_BBOOL = 0;
    let mut usage = [attr(CKA_ENCRYPT, &mut no)];
    assert_eq!(
        call!(m, C_SetAttributeValue(h, kek, usage.as_mut_ptr(), 1)),
        CKR_ATTRIBUTE_READ_ONLY
    );
    // A data object: stored as given, read back, destroyed.
    let mut dclass: CK_ULONG = CKO_DATA;
    let mut app = *b"oracle";
    let mut blob = *b"wallet metadata";
    let mut dt = [
        attr(CKA_CLASS, &mut dclass),
        CK_ATTRIBUTE {
            type_: CKA_APPLICATION,
            pValue: app.as_mut_ptr() as *mut _,
            ulValueLen: app.len() as CK_ULONG,
        },
        CK_ATTRIBUTE {
            type_: CKA_VALUE,
            pValue: blob.as_mut_ptr() as *mut _,
            ulValueLen: blob.len() as CK_ULONG,
        },
    ];
    let mut dobj = 0;
    assert_eq!(
        call!(m, C_CreateObject(h, dt.as_mut_ptr(), 3, &mut dobj)),
        CKR_OK
    );
    let mut back_value = [0u8; 32];
    let mut get = [CK_ATTRIBUTE {
        type_: CKA_VALUE,
        pValue: back_value.as_mut_ptr() as *mut _,
        ulValueLen: 32,
    }];
    assert_eq!(
        call!(m, C_GetAttributeValue(h, dobj, get.as_mut_ptr(), 1)),
        CKR_OK
    );
    assert_eq!(
        &back_value[..get[0].ulValueLen as usize],
        b"wallet metadata"
    );
    assert_eq!(call!(m, C_DestroyObject(h, dobj)), CKR_OK);
    assert_eq!(
        call!(m, C_GetAttributeValue(h, dobj, get.as_mut_ptr(), 1)),
        CKR_OBJECT_HANDLE_INVALID
    );

    // Another crypto user: alice's token key is not bob's.
    assert_eq!(call!(m, C_Logout(h)), CKR_OK);
    let mut bob = *b"bob:bob-password-1";
    assert_eq!(
        call!(
            m,
            C_Login(h, CKU_USER, bob.as_mut_ptr(), bob.len() as CK_ULONG)
        ),
        CKR_OK
    );
    assert_eq!(call!(m, C_EncryptInit(h, &mut cbc, kek)), CKR_OK);
    let mut plain = [5u8; 16];
    let mut out = [0u8; 64];
    let mut n: CK_ULONG = 64;
    assert_eq!(
        call!(
            m,
            C_Encrypt(h, plain.as_mut_ptr(), 16, out.as_mut_ptr(), &mut n)
        ),
        CKR_OBJECT_HANDLE_INVALID,
        "the sidecar refuses bob alice's key"
    );
    let mut none: [CK_ATTRIBUTE; 0] = [];
    assert_eq!(call!(m, C_FindObjectsInit(h, none.as_mut_ptr(), 0)), CKR_OK);
    let mut found = [0 as CK_OBJECT_HANDLE; 16];
    let mut nfound: CK_ULONG = 0;
    assert_eq!(
        call!(m, C_FindObjects(h, found.as_mut_ptr(), 16, &mut nfound)),
        CKR_OK
    );
    assert_eq!(nfound, 0, "bob sees none of alice's objects");
    assert_eq!(call!(m, C_FindObjectsFinal(h)), CKR_OK);
    assert_eq!(call!(m, C_Finalize(null_mut())), CKR_OK);
    let records = audit(&env.db());
    assert!(count(&records, "p11_sign", "ok") >= 161);
    assert!(count(&records, "p11_encrypt", "error") >= 1);
}

/// Must-show 6: the token's secret and private keys, recovered from the
/// store as only the holder of the unseal shares could, appear in no file
/// the sidecar or the module wrote (store, WAL, log, anything under the
/// test directory), in any of the forms a leak would take.
#[test]
fn no_token_key_material_in_any_file_or_log() {
    if !have_tool() {
        return;
    }
    use tde_hsm::store::ObjectStore;

    let env = Env::with_operations("", r#""generate_random", "pkcs11""#);
    let shares = env.init();
    let daemon = env.serve();
    env.unseal(&shares[..3]);
    add_alice(&env, &[]);
    as_alice(
        &env,
        &[
            "--keypairgen",
            "--key-type",
            "rsa:2048",
            "--label",
            "r",
            "--id",
            "31",
        ],
    );
    as_alice(
        &env,
        &[
            "--keypairgen",
            "--key-type",
            "EC:secp384r1",
            "--label",
            "e",
            "--id",
            "32",
        ],
    );
    as_alice(
        &env,
        &[
            "--keygen",
            "--key-type",
            "AES:32",
            "--label",
            "a",
            "--id",
            "33",
            "--sensitive",
        ],
    );
    let data = env.dir.path().join("in");
    std::fs::write(&data, b"use every key once").expect("write");
    let d = data.to_str().expect("utf8");
    let sig = env.dir.path().join("sig");
    let s = sig.to_str().expect("utf8");
    as_alice(
        &env,
        &[
            "--sign",
            "--id",
            "31",
            "-m",
            "SHA256-RSA-PKCS",
            "-i",
            d,
            "-o",
            s,
        ],
    );
    as_alice(
        &env,
        &[
            "--sign",
            "--id",
            "32",
            "-m",
            "ECDSA-SHA384",
            "-i",
            d,
            "-o",
            s,
        ],
    );
    as_alice(
        &env,
        &[
            "--encrypt",
            "--id",
            "33",
            "-m",
            "AES-CBC-PAD",
            "--iv",
            "00000000000000000000000000000000",
            "-i",
            d,
            "-o",
            s,
        ],
    );
    daemon.stop();

    let common::OpenedStore { store, sealer, .. } = common::open_store(&env, &shares);
    let mut secrets: Vec<Vec<u8>> = Vec::new();
    for o in store
        .objects()
        .expect("objects")
        .into_iter()
        .filter(|o| o.kind == tde_hsm::hsm::KIND_P11_OBJECT)
    {
        let pt = sealer
            .open(o.kind, &o.id, o.revision, &o.blob)
            .expect("opens");
        if let Some(m) = tde_hsm::pkcs11::material_of(pt.expose()) {
            // The whole key, and 24-byte windows across it: a key leaked
            // in another encoding still has long runs of the same bytes.
            for at in (0..m.len().saturating_sub(24)).step_by(48) {
                secrets.push(m[at..at + 24].to_vec());
            }
            secrets.push(m);
        }
    }
    assert!(
        secrets.len() > 3,
        "the AES key and both private keys recovered"
    );
    drop(store);
    for s in &secrets {
        let found = common::pg::files_containing(env.dir.path(), s);
        assert!(found.is_empty(), "key bytes in {found:?}");
        let hex: String = s.iter().map(|b| format!("{b:02x}")).collect();
        let found = common::pg::files_containing(env.dir.path(), hex.as_bytes());
        assert!(found.is_empty(), "hex key bytes in {found:?}");
    }
}

/// `fork()` while other threads are inside the module: the child must
/// never find the module's lock held by a thread it does not have (the
/// module takes it around the fork with `pthread_atfork`). Each child
/// initializes again and answers within the alarm, or it is killed and
/// the test fails.
#[test]
fn fork_while_other_threads_call_the_module_never_hangs_the_child() {
    #![allow(unsafe_code)]
    use c_abi::call;
    use cryptoki_sys::*;
    use std::ptr::null_mut;
    use std::sync::atomic::{AtomicBool, Ordering};

    let env = Env::with_operations("", r#""generate_random", "pkcs11""#);
    let _daemon = env.sidecar_with_keys(&[]);
    let m = c_abi::load(&env.data_socket());
    assert_eq!(call!(m, C_Initialize(null_mut())), CKR_OK);
    let mut h: CK_SESSION_HANDLE = 0;
    assert_eq!(
        call!(
            m,
            C_OpenSession(0, CKF_SERIAL_SESSION, null_mut(), None, &mut h)
        ),
        CKR_OK
    );
    let f: &'static CK_FUNCTION_LIST = m.f;
    static STOP: AtomicBool = AtomicBool::new(false);
    let busy: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let mut info: CK_SESSION_INFO = unsafe { std::mem::zeroed() };
                while !STOP.load(Ordering::Relaxed) {
                    // SAFETY: a valid session and out pointer.
                    unsafe { (f.C_GetSessionInfo.expect("info"))(h, &mut info) };
                }
            })
        })
        .collect();
    let mut failed = Vec::new();
    for i in 0..40 {
        // SAFETY: the child calls only the module, alarm and _exit.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork");
        if pid == 0 {
            let mut n: CK_ULONG = 0;
            // SAFETY: valid pointers; alarm kills a child that hangs.
            unsafe {
                libc::alarm(10);
                let code = if (f.C_Initialize.expect("i"))(null_mut()) != CKR_OK {
                    1
                } else if (f.C_GetSlotList.expect("l"))(0, null_mut(), &mut n) != CKR_OK {
                    2
                } else {
                    0
                };
                libc::_exit(code);
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child just made.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) {
            failed.push((i, status));
        }
    }
    STOP.store(true, Ordering::Relaxed);
    for t in busy {
        t.join().expect("busy thread");
    }
    assert!(
        failed.is_empty(),
        "children that hung or failed: {failed:?}"
    );
    assert_eq!(call!(m, C_CloseSession(h)), CKR_OK);
}
