//! The worked examples in docs/PROTOCOL.md, byte for byte.

use tde_protocol::Request;

#[test]
fn generate_data_key_example() {
    let req = Request::GenerateDataKey {
        key: "pg".into(),
        context: [("tablespace".to_string(), "ts1".to_string())].into(),
    };
    let bytes = req.to_frame(7).encode().expect("encode");
    let expected: Vec<u8> = [
        &[0x00, 0x00, 0x00, 0x2b][..],
        &[0x01, 0x01, 0x01, 0x01, 0x00, 0x00, 0x00, 0x00],
        &[0, 0, 0, 0, 0, 0, 0, 7],
        &[0x01, 0, 0, 0, 2, b'p', b'g'],
        &[0x03, 0, 0, 0, 0x0f, 0x00, 0x0a],
        b"tablespace",
        b"ts1",
    ]
    .concat();
    assert_eq!(bytes[..], expected[..]);
}

#[test]
fn status_example() {
    let bytes = Request::Status.to_frame(1).encode().expect("encode");
    assert_eq!(
        bytes[..],
        [0, 0, 0, 16, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1]
    );
}
