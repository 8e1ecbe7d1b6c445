//! Pins the wire format to the frozen golden vectors: every message vector is opened with its key,
//! its fields compared with the file, its body and datagram re-encoded byte-exactly; every crypto
//! vector is re-derived from its inputs. Nothing here regenerates a vector.

use std::collections::BTreeSet;
use std::fs;
use std::path::PathBuf;

use ntm_wire::{
    crypto, open_data, open_signaling, seal_data, AeadKey, DataPacket, Message, MessageType,
    ReplayWindow, Role, SecretKey, SignalingPacket, DATA_HEADER_LEN, DATA_OVERHEAD,
};
use toml::{Table, Value};
use vectors::form;

fn load(sub: &str) -> Vec<(String, Table)> {
    let dir: PathBuf = vectors::dir().join(sub);
    let mut v: Vec<(String, Table)> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .map(|p| {
            let text = fs::read_to_string(&p).expect("readable");
            let t: Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            (
                p.file_stem().expect("stem").to_string_lossy().into_owned(),
                t,
            )
        })
        .collect();
    v.sort_by(|a, b| a.0.cmp(&b.0));
    v
}

fn hexf(t: &Table, k: &str) -> Vec<u8> {
    let s = t
        .get(k)
        .and_then(Value::as_str)
        .unwrap_or_else(|| panic!("missing hex field {k}"));
    hex::decode(s).unwrap_or_else(|e| panic!("{k}: {e}"))
}

fn h32(t: &Table, k: &str) -> [u8; 32] {
    hexf(t, k)
        .try_into()
        .unwrap_or_else(|_| panic!("{k} is not 32 bytes"))
}

fn int(t: &Table, k: &str) -> u64 {
    let i = t
        .get(k)
        .and_then(Value::as_integer)
        .unwrap_or_else(|| panic!("missing int {k}"));
    u64::try_from(i).expect("non-negative")
}

fn key(b: [u8; 32]) -> AeadKey {
    AeadKey::new(&SecretKey::from_bytes(b))
}

#[test]
fn every_message_vector_decodes_to_its_fields_and_re_encodes_byte_exactly() {
    let mut covered = BTreeSet::new();
    for (name, v) in load("messages") {
        if name == "data" {
            continue;
        }
        let datagram = hexf(&v, "datagram");
        let t = MessageType::from_u8(int(&v, "type") as u8).expect("known type");
        assert_eq!(v["message"].as_str(), Some(t.name()), "{name}");
        covered.insert(t);

        let p = SignalingPacket::parse(&datagram).unwrap_or_else(|e| panic!("{name}: {e}"));
        let h = *p.header();
        assert_eq!(h.msg_type, t);
        let role = match v["role"].as_str() {
            Some("A") => Role::A,
            Some("B") => Role::B,
            Some("Relay") => Role::Relay,
            other => panic!("{name}: role {other:?}"),
        };
        assert_eq!(h.envelope.role, role, "{name}");
        assert_eq!(u64::from(h.envelope.key_id), int(&v, "key_id"), "{name}");
        assert_eq!(h.envelope.seq, int(&v, "seq"), "{name}");
        assert_eq!(u64::from(h.envelope.txid), int(&v, "txid"), "{name}");
        assert_eq!(
            h.envelope.ephemeral.map(|e| e.to_vec()),
            v.get("ephemeral").map(|_| hexf(&v, "ephemeral")),
            "{name}"
        );
        let sealed = v["sealed"].as_bool().expect("sealed flag");
        assert_eq!(h.sealed, sealed, "{name}");

        let msg: Message = if sealed {
            // The nonce is role || 0 0 0 || sequence, as spec/02 states.
            let mut n = vec![role as u8, 0, 0, 0];
            n.extend_from_slice(&h.envelope.seq.to_be_bytes());
            assert_eq!(n, hexf(&v, "nonce"), "{name}");
            let k = key(h32(&v, "key"));
            let mut buf = datagram.clone();
            let (h2, m) = open_signaling(&mut buf, &k).unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(h2, h);
            assert_eq!(
                m.seal_to_vec(&h.envelope, &k).expect("fits"),
                datagram,
                "{name}"
            );
            // Any other key fails.
            let mut buf = datagram.clone();
            assert!(
                open_signaling(&mut buf, &key([0xee; 32])).is_err(),
                "{name}"
            );
            m
        } else {
            let m = p.decode_plain().unwrap_or_else(|e| panic!("{name}: {e}"));
            let mut out = vec![0u8; datagram.len()];
            let n = m.encode_plain_into(&h.envelope, &mut out).expect("fits");
            assert_eq!(out[..n], datagram[..], "{name}");
            m
        };
        assert_eq!(msg.msg_type(), t);
        let mut body = Vec::new();
        msg.encode_body(&mut body).expect("a Vec grows");
        assert_eq!(body, hexf(&v, "body"), "{name}: body");
        assert_eq!(Message::decode_body(t, &body).expect("decodes"), msg);
        let fields = v["fields"].as_table().expect("fields table");
        assert_eq!(
            &form::table(&msg.fields()),
            fields,
            "{name}: decoded fields differ"
        );
    }
    let missing: Vec<_> = MessageType::ALL
        .iter()
        .filter(|t| !covered.contains(t))
        .map(|t| t.name())
        .collect();
    assert!(
        missing.is_empty(),
        "message types without a vector: {missing:?}"
    );
}

#[test]
fn the_data_packet_vector_opens_and_re_seals_byte_exactly() {
    let v = load("messages")
        .into_iter()
        .find(|(n, _)| n == "data")
        .expect("data.toml")
        .1;
    let packet = hexf(&v, "packet");
    let inner = hexf(&v, "inner");
    let p = DataPacket::parse(&packet).expect("valid header");
    assert_eq!(u64::from(p.path_id()), int(&v, "path_id"));
    assert_eq!(p.counter(), int(&v, "counter"));
    assert_eq!(p.key_phase(), v["key_phase"].as_bool().expect("bool"));
    assert_eq!(packet.len(), inner.len() + DATA_OVERHEAD);
    let k = key(h32(&v, "key"));
    let mut buf = packet.clone();
    let r = open_data(&k, &mut buf).expect("opens");
    assert_eq!(buf[r], inner[..]);
    let mut again = vec![0u8; packet.len()];
    again[DATA_HEADER_LEN..DATA_HEADER_LEN + inner.len()].copy_from_slice(&inner);
    seal_data(
        &k,
        p.path_id(),
        p.counter(),
        p.key_phase(),
        &mut again,
        inner.len(),
    )
    .expect("fits");
    assert_eq!(again, packet);
}

fn crypto_vector(name: &str) -> Table {
    load("crypto")
        .into_iter()
        .find(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("crypto/{name}.toml missing"))
        .1
}

#[test]
fn the_auth_key_vector_re_derives() {
    let v = crypto_vector("auth_key");
    let salt: [u8; 16] = hexf(&v, "salt").try_into().expect("16 bytes");
    let k = crypto::auth_key(
        v["password"].as_str().expect("text").as_bytes(),
        &salt,
        int(&v, "iterations") as u32,
    );
    assert_eq!(k.expose().to_vec(), hexf(&v, "auth_key"));
}

#[test]
fn the_login_vector_re_derives_every_step() {
    let v = crypto_vector("login");
    let (e_n, s_as, e_as) = (
        h32(&v, "node_ephemeral_secret"),
        h32(&v, "as_static_secret"),
        h32(&v, "as_ephemeral_secret"),
    );
    let p_en = crypto::x25519_public(&e_n);
    let p_sas = crypto::x25519_public(&s_as);
    let p_eas = crypto::x25519_public(&e_as);
    assert_eq!(p_en, h32(&v, "node_ephemeral_public"));
    assert_eq!(p_sas, h32(&v, "as_static_public"));
    assert_eq!(p_eas, h32(&v, "as_ephemeral_public"));
    let dh_es = crypto::x25519(&e_n, &p_sas).expect("contributory");
    let dh_ee = crypto::x25519(&e_n, &p_eas).expect("contributory");
    // Both ends of each agreement agree.
    assert_eq!(*dh_es, *crypto::x25519(&s_as, &p_en).expect("contributory"));
    assert_eq!(*dh_ee, *crypto::x25519(&e_as, &p_en).expect("contributory"));
    assert_eq!(dh_es.to_vec(), hexf(&v, "dh_es"));
    assert_eq!(dh_ee.to_vec(), hexf(&v, "dh_ee"));
    assert_eq!(
        crypto::config_key(&dh_es, &p_en, &p_sas).expose().to_vec(),
        hexf(&v, "config_key")
    );
    assert_eq!(
        crypto::config_response_key(&dh_es, &p_en, &p_sas, &p_eas)
            .expose()
            .to_vec(),
        hexf(&v, "config_response_key")
    );
    let challenge: [u8; 16] = hexf(&v, "challenge").try_into().expect("16 bytes");
    let th = crypto::login_transcript(
        &p_en,
        &p_eas,
        &challenge,
        int(&v, "login_id") as u32,
        v["account"].as_str().expect("text").as_bytes(),
    );
    assert_eq!(th.to_vec(), hexf(&v, "transcript"));
    assert_eq!(
        crypto::login_key(&dh_es, &dh_ee, &th).expose().to_vec(),
        hexf(&v, "login_key")
    );
    let auth = SecretKey::from_bytes(h32(&v, "auth_key"));
    assert_eq!(crypto::login_proof(&auth, &th).to_vec(), hexf(&v, "proof"));
    assert!(crypto::verify_login_proof(&auth, &th, &h32(&v, "proof")));
    // The auth key here is the one the auth_key vector derives from the password.
    assert_eq!(
        hexf(&v, "auth_key"),
        hexf(&crypto_vector("auth_key"), "auth_key")
    );
}

#[test]
fn the_node_derived_keys_vector_re_derives() {
    let v = crypto_vector("node_derived_keys");
    let k = SecretKey::from_bytes(h32(&v, "node_dc_key"));
    assert_eq!(
        crypto::node_ns_key(&k).expose().to_vec(),
        hexf(&v, "node_ns_key")
    );
    assert_eq!(
        crypto::node_cs_key(&k).expose().to_vec(),
        hexf(&v, "node_cs_key")
    );
}

#[test]
fn the_dc_bootstrap_vector_re_derives_at_both_ends() {
    let v = crypto_vector("dc_bootstrap");
    let (e_a, s_a, s_b) = (
        h32(&v, "sender_ephemeral_secret"),
        h32(&v, "sender_static_secret"),
        h32(&v, "receiver_static_secret"),
    );
    let (p_ea, p_sa, p_sb) = (
        crypto::x25519_public(&e_a),
        crypto::x25519_public(&s_a),
        crypto::x25519_public(&s_b),
    );
    assert_eq!(p_ea, h32(&v, "sender_ephemeral_public"));
    assert_eq!(p_sa, h32(&v, "sender_static_public"));
    assert_eq!(p_sb, h32(&v, "receiver_static_public"));
    // The receiver computes the same agreements from its side.
    let es = crypto::x25519(&s_b, &p_ea).expect("contributory");
    let ss = crypto::x25519(&s_b, &p_sa).expect("contributory");
    assert_eq!(es.to_vec(), hexf(&v, "dh_es"));
    assert_eq!(ss.to_vec(), hexf(&v, "dh_ss"));
    let k = crypto::dc_bootstrap_key(&es, &ss, &p_ea, &p_sa, &p_sb);
    assert_eq!(k.expose().to_vec(), hexf(&v, "bootstrap_key"));
}

#[test]
fn the_tunnel_keys_vector_re_derives_at_both_ends() {
    let v = crypto_vector("tunnel_keys");
    let (ei, er) = (
        h32(&v, "initiator_ephemeral_secret"),
        h32(&v, "responder_ephemeral_secret"),
    );
    let (pi, pr) = (crypto::x25519_public(&ei), crypto::x25519_public(&er));
    assert_eq!(pi, h32(&v, "initiator_ephemeral_public"));
    assert_eq!(pr, h32(&v, "responder_ephemeral_public"));
    let cred = SecretKey::from_bytes(h32(&v, "tunnel_credential"));
    let path_id = int(&v, "path_id") as u32;
    let at_i = crypto::tunnel_keys(
        &crypto::x25519(&ei, &pr).expect("ok"),
        &cred,
        path_id,
        &pi,
        &pr,
    );
    let at_r = crypto::tunnel_keys(
        &crypto::x25519(&er, &pi).expect("ok"),
        &cred,
        path_id,
        &pi,
        &pr,
    );
    assert_eq!(at_i, at_r);
    assert_eq!(
        crypto::x25519(&ei, &pr).expect("ok").to_vec(),
        hexf(&v, "dh_ee")
    );
    assert_eq!(
        at_i.initiator_to_responder.expose().to_vec(),
        hexf(&v, "initiator_to_responder")
    );
    assert_eq!(
        at_i.responder_to_initiator.expose().to_vec(),
        hexf(&v, "responder_to_initiator")
    );
    assert_eq!(at_i.control.expose().to_vec(), hexf(&v, "control"));
}

#[test]
fn the_sealed_box_vector_opens_and_re_seals() {
    let v = crypto_vector("sealed_box");
    let r = h32(&v, "recipient_secret");
    assert_eq!(crypto::x25519_public(&r), h32(&v, "recipient_public"));
    let sealed = hexf(&v, "sealed");
    let plain = hexf(&v, "plaintext");
    assert_eq!(crypto::open_box(&r, &sealed).expect("opens"), plain);
    let again = crypto::seal_box(
        &h32(&v, "recipient_public"),
        &h32(&v, "ephemeral_secret"),
        &plain,
    )
    .expect("contributory");
    assert_eq!(again, sealed);
}

#[test]
fn the_replay_window_vector_gives_the_same_decisions() {
    let v = crypto_vector("replay_window");
    assert_eq!(int(&v, "window"), ReplayWindow::SIZE);
    let counters = v["counters"].as_array().expect("array");
    let results = v["results"].as_array().expect("array");
    assert_eq!(counters.len(), results.len());
    let mut w = ReplayWindow::new();
    for (c, r) in counters.iter().zip(results) {
        let c = u64::try_from(c.as_integer().expect("int")).expect("non-negative");
        let got = match w.accept(c) {
            Ok(()) => "accept",
            Err(ntm_wire::Replay::Duplicate) => "duplicate",
            Err(ntm_wire::Replay::TooOld) => "too_old",
            Err(ntm_wire::Replay::Exhausted) => "exhausted",
        };
        assert_eq!(Some(got), r.as_str(), "counter {c}");
    }
}

#[test]
fn no_unauthenticated_request_vector_is_shorter_than_its_answer() {
    // spec/07: an AS drops a CONFIG_REQUEST under 128 bytes, and no unauthenticated request may be
    // answered with more bytes than it carried.
    let by_name: std::collections::BTreeMap<String, Table> = load("messages").into_iter().collect();
    let len = |n: &str| hexf(&by_name[n], "datagram").len();
    assert!(
        len("config_request") >= 128,
        "CONFIG_REQUEST vector is {} bytes",
        len("config_request")
    );
    assert!(len("config_request") >= len("config_response"));
    assert!(
        len("error_plain") <= 31,
        "an unsealed ERROR is at most 31 bytes"
    );
}
