//! Page cipher throughput on 8 KiB pages, one core: `cargo bench -p tde-plugin --bench page`.
//! Ours (PageCipher: AAD build, DRBG nonce, trailer) against the raw AEADs
//! it could be built on, measured in the same run. Prints a table.

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm_siv::aead::{AeadInOut, KeyInit};
use aws_lc_rs::aead::{AES_256_GCM, AES_256_GCM_SIV, Aad, LessSafeKey, Nonce, UnboundKey};
use tde_plugin::page::{PAGE_SIZE, PageCipher, TRAILER_LEN};

fn rate(mut f: impl FnMut()) -> f64 {
    for _ in 0..2000 {
        f();
    }
    let mut n = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_millis(1500) {
        for _ in 0..100 {
            f();
        }
        n += 100;
    }
    (n as f64 * PAGE_SIZE as f64) / start.elapsed().as_secs_f64() / 1e9
}

#[repr(align(4096))]
struct Page([u8; PAGE_SIZE + TRAILER_LEN]);

fn main() {
    let key = [7u8; 32];
    let fid = [1u8; 16];
    let mut plain = Box::new(Page([0u8; PAGE_SIZE + TRAILER_LEN]));
    let mut stored = Box::new(Page([0u8; PAGE_SIZE + TRAILER_LEN]));
    let mut out = Box::new(Page([0u8; PAGE_SIZE + TRAILER_LEN]));
    for (i, b) in plain.0.iter_mut().enumerate() {
        *b = i as u8;
    }

    let mut ours = PageCipher::new("16384").expect("cipher");
    ours.add_key(1, &key).expect("key");
    let ours_enc = rate(|| {
        ours.encrypt_block(&fid, 3, &plain.0[..PAGE_SIZE], &mut stored.0)
            .expect("enc");
        black_box(&stored);
    });
    let ours_dec = rate(|| {
        black_box(
            ours.decrypt_block(&fid, 3, &stored.0, &mut out.0)
                .expect("dec"),
        );
    });

    let aws = |alg| LessSafeKey::new(UnboundKey::new(alg, &key).expect("key"));
    let siv = aws(&AES_256_GCM_SIV);
    let gcm = aws(&AES_256_GCM);
    let raw = |k: &LessSafeKey| {
        let mut buf = plain.0[..PAGE_SIZE].to_vec();
        let enc = rate(|| {
            let tag = k
                .seal_in_place_separate_tag(
                    Nonce::assume_unique_for_key([3; 12]),
                    Aad::from(&[0u8; 64]),
                    &mut buf,
                )
                .expect("seal");
            let _ = black_box(tag);
        });
        let mut sealed = plain.0[..PAGE_SIZE].to_vec();
        let tag = k
            .seal_in_place_separate_tag(
                Nonce::assume_unique_for_key([3; 12]),
                Aad::from(&[0u8; 64]),
                &mut sealed,
            )
            .expect("seal");
        let dec = rate(|| {
            let mut b = sealed.clone();
            k.open_in_place_separate_tag(
                Nonce::assume_unique_for_key([3; 12]),
                Aad::from(&[0u8; 64]),
                tag.as_ref(),
                &mut b,
            )
            .expect("open");
            black_box(b);
        });
        (enc, dec)
    };
    let (siv_enc, siv_dec) = raw(&siv);
    let (gcm_enc, gcm_dec) = raw(&gcm);

    let rc = aes_gcm_siv::Aes256GcmSiv::new((&key).into());
    let mut buf = plain.0[..PAGE_SIZE].to_vec();
    let n = aes_gcm_siv::Nonce::from([3u8; 12]);
    let rc_enc = rate(|| {
        black_box(
            rc.encrypt_inout_detached(&n, &[0u8; 64], buf.as_mut_slice().into())
                .expect("enc"),
        );
    });
    let mut sealed = plain.0[..PAGE_SIZE].to_vec();
    let tag = rc
        .encrypt_inout_detached(&n, &[0u8; 64], sealed.as_mut_slice().into())
        .expect("enc");
    let rc_dec = rate(|| {
        let mut b = sealed.clone();
        rc.decrypt_inout_detached(&n, &[0u8; 64], b.as_mut_slice().into(), &tag)
            .expect("dec");
        black_box(b);
    });

    println!("| 8 KiB page, one core                         | encrypt GB/s | decrypt GB/s |");
    println!("|----------------------------------------------|-------------:|-------------:|");
    for (name, e, d) in [
        (
            "tde PageCipher (aws-lc-rs AES-256-GCM-SIV)",
            ours_enc,
            ours_dec,
        ),
        ("aws-lc-rs AES-256-GCM-SIV, raw", siv_enc, siv_dec),
        ("RustCrypto aes-gcm-siv 0.12, raw", rc_enc, rc_dec),
        ("aws-lc-rs AES-256-GCM, raw (reference)", gcm_enc, gcm_dec),
    ] {
        println!("| {name:<44} | {e:>12.2} | {d:>12.2} |");
    }
    println!(
        "\nPageCipher / raw aws-lc-rs GCM-SIV: encrypt {:.2}x, decrypt {:.2}x",
        ours_enc / siv_enc,
        ours_dec / siv_dec
    );
}
