use super::*;

fn t(pairs: &[(u64, Vec<u8>)]) -> Attrs {
    pairs.to_vec()
}

fn rv(e: HsmError) -> Ckr {
    match e {
        HsmError::Pkcs11(rv, _) => rv,
        other => panic!("not a PKCS#11 refusal: {other}"),
    }
}

fn entry(attrs: Attrs, material: Material) -> Entry {
    Entry {
        owner: "alice".into(),
        attrs,
        material,
    }
}

fn aes() -> Entry {
    let (a, m) =
        secret_key(&t(&[(CKA_VALUE_LEN, ul(32))]), None, Some(CKM_AES_KEY_GEN)).expect("aes");
    entry(a, m)
}

#[test]
fn aes_gcm_and_cbc_round_trip_and_refuse_tampering() {
    let k = aes();
    assert_eq!(
        get(&k.attrs, CKA_VALUE),
        None,
        "no key bytes among the attributes"
    );
    assert_eq!(
        flag(&k.attrs, CKA_NEVER_EXTRACTABLE).expect("flag"),
        Some(true)
    );
    let iv = [7u8; 12];
    let ct = k
        .crypt(true, CKM_AES_GCM, &iv, b"aad", b"table key 1")
        .expect("seal");
    assert_eq!(ct.expose().len(), 11 + 16);
    let pt = k
        .crypt(false, CKM_AES_GCM, &iv, b"aad", ct.expose())
        .expect("open");
    assert_eq!(pt.expose(), b"table key 1");
    let mut bad = ct.expose().to_vec();
    bad[3] ^= 1;
    assert_eq!(
        rv(k.crypt(false, CKM_AES_GCM, &iv, b"aad", &bad)
            .expect_err("tampered")),
        Ckr::CKR_ENCRYPTED_DATA_INVALID
    );
    assert_eq!(
        rv(k.crypt(true, CKM_AES_GCM, &[0u8; 16], b"", b"x")
            .expect_err("iv")),
        Ckr::CKR_MECHANISM_PARAM_INVALID
    );

    let iv = [9u8; 16];
    let ct = k
        .crypt(true, CKM_AES_CBC_PAD, &iv, b"", &[1u8; 32])
        .expect("cbc");
    assert_eq!(
        ct.expose().len(),
        48,
        "a whole padding block after 32 bytes"
    );
    let pt = k
        .crypt(false, CKM_AES_CBC_PAD, &iv, b"", ct.expose())
        .expect("cbc");
    assert_eq!(pt.expose(), &[1u8; 32]);
    assert_eq!(
        rv(k.crypt(false, CKM_AES_CBC_PAD, &iv, b"", &[0u8; 15])
            .expect_err("len")),
        Ckr::CKR_ENCRYPTED_DATA_LEN_RANGE
    );
}

#[test]
fn nist_sp800_38a_cbc_vector() {
    // SP 800-38A F.2.5 (CBC-AES256.Encrypt), first block; PKCS#7 then adds
    // one block of padding.
    let key = hex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4");
    let (a, m) = secret_key(&[], Some(SecretBuf::new(key)), None).expect("import");
    let k = entry(a, m);
    let iv = hex("000102030405060708090a0b0c0d0e0f");
    let ct = k
        .crypt(
            true,
            CKM_AES_CBC_PAD,
            &iv,
            b"",
            &hex("6bc1bee22e409f96e93d7e117393172a"),
        )
        .expect("cbc");
    assert_eq!(
        ct.expose()[..16],
        hex("f58c4c04d6e5f1ba779eabfb5f7bfbd6")[..]
    );
}

#[test]
fn rfc3394_vector_and_wrap_rules() {
    // RFC 3394 section 4.6: 256-bit data with a 256-bit KEK.
    let kek = hex("000102030405060708090A0B0C0D0E0F101112131415161718191A1B1C1D1E1F");
    let data = hex("00112233445566778899AABBCCDDEEFF000102030405060708090A0B0C0D0E0F");
    let (a, m) = secret_key(&[], Some(SecretBuf::new(kek)), None).expect("kek");
    let kek = entry(a, m);
    let (a, m) = secret_key(
        &t(&[(CKA_EXTRACTABLE, yes(true))]),
        Some(SecretBuf::new(data.clone())),
        None,
    )
    .expect("target");
    let target = entry(a, m);
    let wrapped = kek.wrap(CKM_AES_KEY_WRAP, &[], &target).expect("wrap");
    assert_eq!(
        wrapped,
        hex("28C9F404C4B810F4CBCCB35CFB87F8263F5786E2D80ED326CBC7F0E71A99F43BFB988B9B7A02DD21")
    );
    let back = kek.unwrap(CKM_AES_KEY_WRAP, &[], &wrapped).expect("unwrap");
    assert_eq!(back.expose(), data.as_slice());
    let mut bad = wrapped.clone();
    bad[0] ^= 1;
    assert_eq!(
        rv(kek.unwrap(CKM_AES_KEY_WRAP, &[], &bad).expect_err("bad")),
        Ckr::CKR_WRAPPED_KEY_INVALID
    );
    let padded = kek.wrap(CKM_AES_KEY_WRAP_PAD, &[], &target).expect("kwp");
    assert_eq!(
        kek.unwrap(CKM_AES_KEY_WRAP_KWP, &[], &padded)
            .expect("kwp")
            .expose(),
        data.as_slice()
    );
    // A key made without CKA_EXTRACTABLE never leaves.
    assert_eq!(
        rv(kek
            .wrap(CKM_AES_KEY_WRAP, &[], &aes())
            .expect_err("unextractable")),
        Ckr::CKR_KEY_UNEXTRACTABLE
    );
}

fn pair(mech: u64, public: &[(u64, Vec<u8>)]) -> (Entry, Entry) {
    let (p, s, m) = key_pair(mech, public, &[]).expect("pair");
    (entry(p, Material::None), entry(s, m))
}

fn sha(alg: &'static digest::Algorithm, data: &[u8]) -> Vec<u8> {
    digest::digest(alg, data).as_ref().to_vec()
}

#[test]
fn rsa_signs_pkcs1_and_pss_and_verifies() {
    let (public, private) = pair(CKM_RSA_PKCS_KEY_PAIR_GEN, &[(CKA_MODULUS_BITS, ul(2048))]);
    assert_eq!(get(&public.attrs, CKA_MODULUS).map(<[u8]>::len), Some(256));
    assert_eq!(
        get(&private.attrs, CKA_PUBLIC_EXPONENT),
        Some(&[1u8, 0, 1][..])
    );
    let h = sha(&digest::SHA256, b"message");
    let sig = private.sign(CKM_SHA256_RSA_PKCS, &[], &h).expect("sign");
    public
        .verify(CKM_SHA256_RSA_PKCS, &[], &h, &sig)
        .expect("verify");
    // The same with CKM_RSA_PKCS over the DigestInfo: the same signature
    // (PKCS#1 v1.5 is deterministic).
    let mut info = hex("3031300d060960864801650304020105000420");
    info.extend_from_slice(&h);
    assert_eq!(private.sign(CKM_RSA_PKCS, &[], &info).expect("raw"), sig);
    let mut bad = sig.clone();
    bad[10] ^= 1;
    assert_eq!(
        rv(public
            .verify(CKM_SHA256_RSA_PKCS, &[], &h, &bad)
            .expect_err("bad")),
        Ckr::CKR_SIGNATURE_INVALID
    );
    // CKM_RSA_PKCS signs what it is given (here a SHA-1 DigestInfo, as
    // pkcs11-tool --test does), up to the modulus length less 11 bytes.
    let sha1_info = hex("3021300906052b0e03021a0500041429b0e7878271645fffb7eec7db4a7473a1c00bc1");
    let raw = private.sign(CKM_RSA_PKCS, &[], &sha1_info).expect("raw");
    public
        .verify(CKM_RSA_PKCS, &[], &sha1_info, &raw)
        .expect("verify raw");
    assert_eq!(
        rv(public
            .verify(CKM_RSA_PKCS, &[], &sha1_info[1..], &raw)
            .expect_err("other data")),
        Ckr::CKR_SIGNATURE_INVALID
    );
    assert_eq!(
        rv(private
            .sign(CKM_RSA_PKCS, &[], &[7u8; 246])
            .expect_err("too long")),
        Ckr::CKR_DATA_LEN_RANGE
    );
    private
        .sign(CKM_RSA_PKCS, &[], &[7u8; 245])
        .expect("longest");
    let mut pss = Vec::new();
    for v in [CKM_SHA256, CKG_MGF1_SHA256, 32] {
        pss.extend_from_slice(&v.to_be_bytes());
    }
    let s1 = private.sign(CKM_RSA_PKCS_PSS, &pss, &h).expect("pss");
    let s2 = private
        .sign(CKM_SHA256_RSA_PKCS_PSS, &pss, &h)
        .expect("pss");
    assert_ne!(s1, s2, "PSS is randomized");
    public
        .verify(CKM_RSA_PKCS_PSS, &pss, &h, &s1)
        .expect("verify pss");
    public
        .verify(CKM_SHA256_RSA_PKCS_PSS, &pss, &h, &s2)
        .expect("verify pss");
    assert_eq!(
        rv(private
            .sign(CKM_SHA384_RSA_PKCS_PSS, &pss, &h)
            .expect_err("hash mismatch")),
        Ckr::CKR_MECHANISM_PARAM_INVALID
    );
    // Usage flags hold.
    assert_eq!(
        rv(public
            .sign(CKM_SHA256_RSA_PKCS, &[], &h)
            .expect_err("public")),
        Ckr::CKR_KEY_FUNCTION_NOT_PERMITTED
    );
    // OAEP both ways.
    let mut oaep = Vec::new();
    for v in [CKM_SHA256, CKG_MGF1_SHA256] {
        oaep.extend_from_slice(&v.to_be_bytes());
    }
    let ct = public
        .crypt(true, CKM_RSA_PKCS_OAEP, &oaep, b"label", b"secret")
        .expect("oaep");
    let pt = private
        .crypt(false, CKM_RSA_PKCS_OAEP, &oaep, b"label", ct.expose())
        .expect("oaep");
    assert_eq!(pt.expose(), b"secret");
    assert_eq!(
        rv(private
            .crypt(false, CKM_RSA_PKCS_OAEP, &oaep, b"other", ct.expose())
            .expect_err("label")),
        Ckr::CKR_ENCRYPTED_DATA_INVALID
    );
}

#[test]
fn ec_signs_and_verifies_on_both_curves() {
    for (oid, n, mech, alg) in [
        (P256_OID, 32usize, CKM_ECDSA_SHA256, &digest::SHA256),
        (P384_OID, 48, CKM_ECDSA_SHA384, &digest::SHA384),
    ] {
        let (public, private) = pair(CKM_EC_KEY_PAIR_GEN, &[(CKA_EC_PARAMS, oid.to_vec())]);
        let point = get(&public.attrs, CKA_EC_POINT).expect("point");
        assert_eq!(point.len(), 2 + 1 + 2 * n, "DER OCTET STRING of 04|x|y");
        let h = sha(alg, b"message");
        let sig = private.sign(mech, &[], &h).expect("sign");
        assert_eq!(sig.len(), 2 * n, "r | s");
        public.verify(CKM_ECDSA, &[], &h, &sig).expect("verify raw");
        public.verify(mech, &[], &h, &sig).expect("verify");
        let mut bad = sig.clone();
        bad[0] ^= 1;
        assert_eq!(
            rv(public.verify(mech, &[], &h, &bad).expect_err("bad")),
            Ckr::CKR_SIGNATURE_INVALID
        );
        // CKM_ECDSA over a longer hash: its leftmost bytes (FIPS 186-5).
        let long = sha(&digest::SHA512, b"message");
        let sig = private.sign(CKM_ECDSA, &[], &long).expect("sign 512");
        public
            .verify(CKM_ECDSA, &[], &long[..n], &sig)
            .expect("same as truncated");
        assert_eq!(
            rv(private
                .sign(CKM_SHA256_RSA_PKCS, &[], &h)
                .expect_err("rsa mech")),
            Ckr::CKR_MECHANISM_INVALID
        );
    }
}

#[test]
fn templates_are_checked() {
    let refused = |tpl: &[(u64, Vec<u8>)]| {
        rv(secret_key(tpl, None, Some(CKM_AES_KEY_GEN)).expect_err("refused"))
    };
    assert_eq!(
        refused(&[(CKA_SENSITIVE, yes(false))]),
        Ckr::CKR_ATTRIBUTE_VALUE_INVALID
    );
    assert_eq!(refused(&[(CKA_VALUE_LEN, ul(24))]), Ckr::CKR_KEY_SIZE_RANGE);
    assert_eq!(
        refused(&[(CKA_LOCAL, yes(true))]),
        Ckr::CKR_ATTRIBUTE_READ_ONLY
    );
    assert_eq!(
        refused(&[(CKA_VALUE, vec![7; 32])]),
        Ckr::CKR_ATTRIBUTE_READ_ONLY,
        "a key's value never comes from a template"
    );
    assert_eq!(
        refused(&[(CKA_MODULUS, vec![1])]),
        Ckr::CKR_ATTRIBUTE_TYPE_INVALID
    );
    assert_eq!(
        refused(&[(CKA_VALUE_LEN, vec![1])]),
        Ckr::CKR_ATTRIBUTE_VALUE_INVALID
    );
    assert_eq!(
        refused(&[(CKA_LABEL, vec![1]), (CKA_LABEL, vec![2])]),
        Ckr::CKR_TEMPLATE_INCONSISTENT
    );
    let many: Attrs = (0..65).map(|i| (0x8000_0000 + i, vec![])).collect();
    assert_eq!(refused(&many), Ckr::CKR_TEMPLATE_INCONSISTENT);
    let e = key_pair(
        CKM_RSA_PKCS_KEY_PAIR_GEN,
        &[(CKA_MODULUS_BITS, ul(1024))],
        &[],
    );
    assert_eq!(rv(e.expect_err("1024")), Ckr::CKR_KEY_SIZE_RANGE);
    let e = key_pair(CKM_EC_KEY_PAIR_GEN, &[(CKA_EC_PARAMS, vec![6, 1, 1])], &[]);
    assert_eq!(rv(e.expect_err("curve")), Ckr::CKR_ATTRIBUTE_VALUE_INVALID);
    let label = b"ORACLE.TDE.HSM.MK.0601".to_vec();
    let (a, _) = secret_key(
        &[(CKA_LABEL, label.clone()), (CKA_TOKEN, yes(true))],
        None,
        Some(CKM_AES_KEY_GEN),
    )
    .expect("labelled");
    assert_eq!(get(&a, CKA_LABEL), Some(label.as_slice()));
}

#[test]
fn debug_shows_no_key_bytes() {
    let key = [0x5Au8, 0xC3, 0x7E, 0x11].repeat(8);
    let m = Material::Aes(SecretBuf::new(key));
    let shown = format!("{m:?} {m:#?}");
    assert!(!shown.contains("5a") && !shown.contains("90,"), "{shown}");
    let (_, private) = pair(CKM_RSA_PKCS_KEY_PAIR_GEN, &[(CKA_MODULUS_BITS, ul(2048))]);
    assert_eq!(
        format!("{:?}", private.material),
        "Material::Rsa([REDACTED])"
    );
}

#[test]
fn records_round_trip_with_their_material() {
    let k = aes();
    let back = decode(encode(&k).expose()).expect("decode");
    assert_eq!(back.attrs, k.attrs);
    let iv = [1u8; 12];
    let ct = k.crypt(true, CKM_AES_GCM, &iv, b"", b"x").expect("seal");
    assert_eq!(
        back.crypt(false, CKM_AES_GCM, &iv, b"", ct.expose())
            .expect("open")
            .expose(),
        b"x"
    );
    let (_, private) = pair(CKM_EC_KEY_PAIR_GEN, &[(CKA_EC_PARAMS, P256_OID.to_vec())]);
    let back = decode(encode(&private).expose()).expect("decode ec");
    assert!(matches!(back.material, Material::Ec(..)));
    let record = encode(&private);
    assert!(decode(&record.expose()[..record.expose().len() - 1]).is_err());
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).expect("hex"))
        .collect()
}
