//! The fuzz targets' bodies. `fuzz/fuzz_targets/*.rs` call these under libFuzzer, and
//! `tests/fuzz_corpora.rs` replays every committed corpus and regression input through the same
//! functions on each `cargo test`, so a fixed crash stays fixed.
//!
//! Every function asserts the wire contract on what it decodes (decode then encode reproduces the
//! input; sealing then opening gives the message back); a violated assertion is a finding.

use arbitrary::{Arbitrary, Unstructured};
use ntm_wire::message::EphemeralRule;
use ntm_wire::{
    classify, crypto, open_data, open_signaling, seal_data, signaling::stream, AeadKey, DataPacket,
    Datagram, Envelope, Message, MessageType, ReplayWindow, SecretKey, SignalingPacket,
    DATA_HEADER_LEN, DATA_OVERHEAD,
};

/// The fixed key every target opens with (also the key of the sealed golden vectors' seeds).
pub fn fixed_key() -> AeadKey {
    AeadKey::new(&SecretKey::from_bytes(FIXED_KEY))
}

/// The bytes of [`fixed_key`].
pub const FIXED_KEY: [u8; 32] = [0x5a; 32];

/// A static X25519 secret for the sealed-box target.
pub const FIXED_BOX_SECRET: [u8; 32] = [0x33; 32];

/// A fuzz target's body.
pub type Target = fn(&[u8]);

/// The names of all targets, as directories under `fuzz/corpus/` and `fuzz/regressions/`.
pub const TARGETS: &[(&str, Target)] = &[
    ("datagram", datagram),
    ("signaling_header", signaling_header),
    ("message_body", message_body),
    ("data_open", data_open),
    ("stream_frames", stream_frames),
    ("sealed_box", sealed_box),
    ("roundtrip", roundtrip),
];

/// Any datagram a node or server can receive: classify, then open or decode it like a receiver.
pub fn datagram(data: &[u8]) {
    let mut buf = data.to_vec();
    match classify(data) {
        Ok(Datagram::Data(p)) => {
            let mut w = ReplayWindow::new();
            if w.check(p.counter()).is_ok() && open_data(&fixed_key(), &mut buf).is_ok() {
                assert!(w.accept(p.counter()).is_ok());
            }
        }
        Ok(Datagram::Signaling(p)) => {
            if p.header().sealed {
                if let Ok((h, m)) = open_signaling(&mut buf, &fixed_key()) {
                    assert_eq!(h, *p.header());
                    let again = m.seal_to_vec(&h.envelope, &fixed_key()).expect("re-seal");
                    assert_eq!(again, data, "re-sealing an opened datagram changed it");
                }
            } else if let Ok(m) = p.decode_plain() {
                let mut out = vec![0u8; data.len()];
                let n = m
                    .encode_plain_into(&p.header().envelope, &mut out)
                    .expect("re-encode");
                assert_eq!(&out[..n], data, "re-encoding a plain datagram changed it");
            }
        }
        Err(_) => {}
    }
}

/// The signaling header check alone.
pub fn signaling_header(data: &[u8]) {
    if let Ok(p) = SignalingPacket::parse(data) {
        let h = p.header();
        assert_eq!(h.msg_type.to_u8(), data[0]);
        match h.msg_type.ephemeral() {
            EphemeralRule::Required => assert!(h.envelope.ephemeral.is_some()),
            EphemeralRule::Forbidden => assert!(h.envelope.ephemeral.is_none()),
            EphemeralRule::Optional => {}
        }
        assert!(h.sealed || h.msg_type.may_be_plaintext());
    }
}

/// A message body: the first byte picks the type, the rest is the body. Whatever decodes must
/// re-encode to exactly the same bytes (one encoding per message).
pub fn message_body(data: &[u8]) {
    let Some((&sel, body)) = data.split_first() else {
        return;
    };
    let t = MessageType::ALL[usize::from(sel) % MessageType::ALL.len()];
    if let Ok(m) = Message::decode_body(t, body) {
        assert_eq!(m.msg_type(), t);
        assert_eq!(m.body_len(), body.len());
        let mut out = Vec::new();
        m.encode_body(&mut out).expect("a Vec grows");
        assert_eq!(out, body, "{} did not re-encode byte-exactly", t.name());
    }
}

/// Data packets under the fixed key: arbitrary bytes are opened as received packets; the first
/// byte also selects a mode that seals the input as an inner packet and flips one bit, so the
/// authenticated path is reached too.
pub fn data_open(data: &[u8]) {
    let mut buf = data.to_vec();
    if let Ok(p) = DataPacket::parse(data) {
        let _ = (p.path_id(), p.key_phase(), p.inner_len());
        let _ = open_data(&fixed_key(), &mut buf);
    }
    if data.len() >= 3 {
        let flip = usize::from(u16::from_be_bytes([data[0], data[1]]));
        let inner = &data[2..];
        let mut pkt = vec![0u8; inner.len() + DATA_OVERHEAD];
        pkt[DATA_HEADER_LEN..DATA_HEADER_LEN + inner.len()].copy_from_slice(inner);
        let n = seal_data(
            &fixed_key(),
            7,
            u64::from(data[0]),
            false,
            &mut pkt,
            inner.len(),
        )
        .expect("buffer sized for the packet");
        let mut opened = pkt.clone();
        let r = open_data(&fixed_key(), &mut opened).expect("own packet opens");
        assert_eq!(&opened[r], inner);
        let i = flip % (8 * n);
        pkt[i / 8] ^= 1 << (i % 8);
        assert!(
            open_data(&fixed_key(), &mut pkt).is_err(),
            "bit {i} flip accepted"
        );
    }
}

/// The NS push channel: a byte stream cut into frames, each frame a signaling datagram.
pub fn stream_frames(data: &[u8]) {
    let mut rest = data;
    let mut frames = 0;
    while let Ok(Some((start, end))) = stream::next_frame(rest) {
        assert!(start <= end && end <= rest.len());
        let frame = &rest[start..end];
        let _ = SignalingPacket::parse(frame);
        frames += 1;
        rest = &rest[end..];
        assert!(frames <= data.len());
    }
}

/// Sealed boxes (cache blobs): arbitrary bytes opened with a fixed secret; and a seal/open
/// round trip of the input.
pub fn sealed_box(data: &[u8]) {
    let _ = crypto::open_box(&FIXED_BOX_SECRET, data);
    let recipient = crypto::x25519_public(&FIXED_BOX_SECRET);
    let mut eph = [0x44u8; 32];
    if let Some(&b) = data.first() {
        eph[0] = b;
    }
    if let Ok(boxed) = crypto::seal_box(&recipient, &eph, data) {
        assert_eq!(
            crypto::open_box(&FIXED_BOX_SECRET, &boxed).expect("opens"),
            data
        );
    }
}

/// Structured: an arbitrary message and envelope must seal, open, and re-encode to themselves.
pub fn roundtrip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(sel) = u8::arbitrary(&mut u) else {
        return;
    };
    let t = MessageType::ALL[usize::from(sel) % MessageType::ALL.len()];
    let Ok(msg) = Message::arbitrary_of_type(t, &mut u) else {
        return;
    };
    let Ok(mut env) = Envelope::arbitrary(&mut u) else {
        return;
    };
    env.ephemeral = match t.ephemeral() {
        EphemeralRule::Required => Some(env.ephemeral.unwrap_or([9; 32])),
        EphemeralRule::Forbidden => None,
        EphemeralRule::Optional => env.ephemeral,
    };
    let Ok(wire) = msg.seal_to_vec(&env, &fixed_key()) else {
        // Only an over-long message may be refused.
        assert!(msg.datagram_len(&env, true) > ntm_wire::MAX_SIGNALING_LEN);
        return;
    };
    let mut buf = wire.clone();
    let (h, back) = open_signaling(&mut buf, &fixed_key()).expect("own datagram opens");
    assert_eq!(back, msg);
    assert_eq!(h.envelope, env);
    let mut body = Vec::new();
    msg.encode_body(&mut body).expect("a Vec grows");
    assert_eq!(
        Message::decode_body(t, &body).expect("own body decodes"),
        msg
    );
}
