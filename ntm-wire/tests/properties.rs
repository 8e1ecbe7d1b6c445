//! quickcheck properties over every signaling message type and the data packet. Messages come
//! from `arbitrary` driven by quickcheck's random bytes, so each property covers every type in
//! `MessageType::ALL` for every generated input.

use arbitrary::{Arbitrary, Unstructured};
use ntm_wire::message::EphemeralRule;
use ntm_wire::{
    classify, open_data, open_signaling, seal_data, AeadKey, DataPacket, Envelope, Extensions,
    Message, MessageType, ReplayWindow, SecretKey, SignalingPacket, DATA_HEADER_LEN, DATA_OVERHEAD,
};
use quickcheck::{Gen, QuickCheck, TestResult};

const TESTS: u64 = 300;

fn qc() -> QuickCheck {
    QuickCheck::new().tests(TESTS).rng(Gen::new(2048))
}

fn key() -> AeadKey {
    AeadKey::new(&SecretKey::from_bytes([0x5a; 32]))
}

fn envelope_for(t: MessageType, u: &mut Unstructured<'_>) -> arbitrary::Result<Envelope> {
    let mut env = Envelope::arbitrary(u)?;
    env.ephemeral = match t.ephemeral() {
        EphemeralRule::Required => Some(<[u8; 32]>::arbitrary(u)?),
        EphemeralRule::Forbidden => None,
        EphemeralRule::Optional => env.ephemeral,
    };
    Ok(env)
}

/// Runs `check` on a message of every type built from `seed`; returns the first failure.
fn for_every_type(
    seed: &[u8],
    mut check: impl FnMut(MessageType, Message, Envelope) -> Result<(), String>,
) -> TestResult {
    for &t in MessageType::ALL {
        let mut u = Unstructured::new(seed);
        let (msg, env) = match (
            Message::arbitrary_of_type(t, &mut u),
            envelope_for(t, &mut u),
        ) {
            (Ok(m), Ok(e)) => (m, e),
            _ => continue,
        };
        assert_eq!(msg.msg_type(), t);
        if let Err(e) = check(t, msg, env) {
            return TestResult::error(format!("{}: {e}", t.name()));
        }
    }
    TestResult::passed()
}

#[test]
fn every_message_seals_and_opens_to_itself_and_re_encodes_byte_exactly() {
    fn prop(seed: Vec<u8>) -> TestResult {
        for_every_type(&seed, |_, msg, env| {
            let wire = msg.seal_to_vec(&env, &key()).map_err(|e| e.to_string())?;
            let mut buf = wire.clone();
            let (header, back) = open_signaling(&mut buf, &key()).map_err(|e| e.to_string())?;
            if back != msg || header.envelope != env || !header.sealed {
                return Err(format!("decoded {back:?} / {header:?}"));
            }
            let again = back
                .seal_to_vec(&header.envelope, &key())
                .map_err(|e| e.to_string())?;
            if again != wire {
                return Err("re-encoding changed the bytes".into());
            }
            Ok(())
        })
    }
    qc().quickcheck(prop as fn(Vec<u8>) -> TestResult);
}

#[test]
fn every_body_decodes_to_itself_and_re_encodes_byte_exactly() {
    fn prop(seed: Vec<u8>) -> TestResult {
        for_every_type(&seed, |t, msg, _| {
            let body = body_of(&msg);
            if body.len() != msg.body_len() {
                return Err("body_len disagrees with the encoding".into());
            }
            let back = Message::decode_body(t, &body).map_err(|e| e.to_string())?;
            if back != msg || body_of(&back) != body {
                return Err(format!("decoded {back:?}"));
            }
            Ok(())
        })
    }
    qc().quickcheck(prop as fn(Vec<u8>) -> TestResult);
}

#[test]
fn every_truncation_of_a_datagram_is_an_error() {
    fn prop(seed: Vec<u8>) -> TestResult {
        for_every_type(&seed, |_, msg, env| {
            let wire = msg.seal_to_vec(&env, &key()).map_err(|e| e.to_string())?;
            for n in 0..wire.len() {
                let mut b = wire[..n].to_vec();
                if SignalingPacket::parse(&b).is_ok() || open_signaling(&mut b, &key()).is_ok() {
                    return Err(format!("truncation to {n} bytes was accepted"));
                }
            }
            Ok(())
        })
    }
    qc().tests(60).quickcheck(prop as fn(Vec<u8>) -> TestResult);
}

#[test]
fn every_truncation_of_a_body_without_extensions_is_an_error() {
    fn prop(seed: Vec<u8>) -> TestResult {
        for_every_type(&seed, |t, msg, _| {
            let mut msg = msg;
            strip_extensions(&mut msg);
            let body = body_of(&msg);
            for n in 0..body.len() {
                if let Ok(other) = Message::decode_body(t, &body[..n]) {
                    return Err(format!("body truncated to {n} decoded as {other:?}"));
                }
            }
            Ok(())
        })
    }
    qc().tests(100)
        .quickcheck(prop as fn(Vec<u8>) -> TestResult);
}

fn body_of(msg: &Message) -> Vec<u8> {
    let mut body = Vec::new();
    msg.encode_body(&mut body).expect("a Vec grows");
    body
}

fn strip_extensions(msg: &mut Message) {
    let ext_len: usize = msg
        .extensions()
        .as_slice()
        .iter()
        .map(|e| 4 + e.value.len())
        .sum();
    let mut body = body_of(msg);
    body.truncate(body.len() - ext_len);
    *msg = Message::decode_body(msg.msg_type(), &body).expect("the fields alone decode");
    assert_eq!(msg.extensions(), &Extensions::none());
}

#[test]
fn flipping_any_bit_of_a_sealed_datagram_is_rejected() {
    fn prop(seed: Vec<u8>, pos: usize, bit: u8) -> TestResult {
        for_every_type(&seed, |_, msg, env| {
            let wire = msg.seal_to_vec(&env, &key()).map_err(|e| e.to_string())?;
            let mut b = wire.clone();
            let i = pos % b.len();
            b[i] ^= 1 << (bit % 8);
            match open_signaling(&mut b, &key()) {
                Ok((_, m)) => Err(format!("bit flip at {i} accepted as {m:?}")),
                Err(_) => Ok(()),
            }
        })
    }
    qc().quickcheck(prop as fn(Vec<u8>, usize, u8) -> TestResult);
}

#[test]
fn decoding_arbitrary_bytes_never_panics() {
    fn prop(bytes: Vec<u8>) -> bool {
        let _ = classify(&bytes);
        for &t in MessageType::ALL {
            let _ = Message::decode_body(t, &bytes);
        }
        let mut b = bytes.clone();
        let _ = open_signaling(&mut b, &key());
        let mut b = bytes.clone();
        let _ = open_data(&key(), &mut b);
        // Same again with a valid-looking header in front, to get past the first checks.
        for &t in MessageType::ALL {
            let mut d = vec![
                t.to_u8(),
                1,
                0,
                1,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
                0,
            ];
            d.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            d.extend_from_slice(&bytes);
            let _ = SignalingPacket::parse(&d).map(|p| p.decode_plain());
            let _ = open_signaling(&mut d, &key());
        }
        true
    }
    QuickCheck::new()
        .tests(2000)
        .rng(Gen::new(512))
        .quickcheck(prop as fn(Vec<u8>) -> bool);
}

#[test]
fn data_packets_round_trip_and_replays_are_caught() {
    fn prop(inner: Vec<u8>, path_id: u32, counter: u32, phase: bool) -> TestResult {
        let counter = u64::from(counter);
        let mut buf = vec![0u8; inner.len() + DATA_OVERHEAD];
        buf[DATA_HEADER_LEN..DATA_HEADER_LEN + inner.len()].copy_from_slice(&inner);
        let n = seal_data(&key(), path_id, counter, phase, &mut buf, inner.len()).unwrap();
        let received = buf[..n].to_vec();
        let mut window = ReplayWindow::new();
        let p = DataPacket::parse(&received).unwrap();
        if (p.path_id(), p.counter(), p.key_phase()) != (path_id, counter, phase) {
            return TestResult::failed();
        }
        if window.check(p.counter()).is_err() {
            return TestResult::failed();
        }
        let mut b = received.clone();
        let r = match open_data(&key(), &mut b) {
            Ok(r) => r,
            Err(_) => return TestResult::failed(),
        };
        if b[r] != inner[..] || window.accept(counter).is_err() {
            return TestResult::failed();
        }
        // The same packet again is refused by the window before any decryption.
        TestResult::from_bool(window.check(counter).is_err())
    }
    qc().quickcheck(prop as fn(Vec<u8>, u32, u32, bool) -> TestResult);
}

#[test]
fn the_largest_messages_with_the_longest_names_fit_the_signaling_limit() {
    use ntm_wire::message::{CacheData, CacheStore, Notification, NotifyReason};
    use ntm_wire::{Blob, Envelope, Fqdn, Role, MAX_SIGNALING_LEN};
    let long = [&"a".repeat(63)[..]; 3].join(".") + "." + &"b".repeat(61); // 253 bytes
    let name = Fqdn::new(&long).unwrap();
    assert_eq!(name.as_str().len(), 253);
    let blob = Blob::new(vec![0xab; Blob::MAX_LEN]).unwrap();
    let env = Envelope {
        role: Role::A,
        key_id: 1,
        seq: u64::MAX,
        txid: u32::MAX,
        ephemeral: None,
    };
    let msgs: [Message; 3] = [
        CacheStore {
            recipient_fqdn: name.clone(),
            ttl_s: u32::MAX,
            blob: blob.clone(),
            extensions: Extensions::none(),
        }
        .into(),
        CacheData {
            item_id: u64::MAX,
            sender_fqdn: name,
            age_s: u32::MAX,
            remaining: u16::MAX,
            blob: blob.clone(),
            extensions: Extensions::none(),
        }
        .into(),
        Notification {
            node_key_id: u32::MAX,
            reason: NotifyReason::Signaling,
            payload: blob,
            extensions: Extensions::none(),
        }
        .into(),
    ];
    for m in msgs {
        let len = m.datagram_len(&env, true);
        assert!(
            len <= MAX_SIGNALING_LEN,
            "{} is {len} bytes",
            m.msg_type().name()
        );
        assert!(m.seal_to_vec(&env, &key()).is_ok());
    }
}
