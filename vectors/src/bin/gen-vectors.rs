//! Writes the golden vectors (`vectors/messages`, `vectors/crypto`) and the fuzz seeds
//! (`fuzz/seeds`). Vectors are frozen once written: this refuses to overwrite an existing vector
//! file unless run with `--force`, which is only right when the specification's version changes.
//!
//!     cargo run -p vectors --bin gen-vectors [-- --force]

use std::fs;
use std::path::Path;

use ntm_wire::crypto;
use ntm_wire::signaling::stream;
use ntm_wire::{
    seal_data, AeadKey, MessageType, ReplayWindow, Role, SecretKey, DATA_HEADER_LEN, DATA_OVERHEAD,
};
use toml::{Table, Value};
use vectors::harness::{FIXED_BOX_SECRET, FIXED_KEY};
use vectors::{form, samples};

fn hx(b: &[u8]) -> Value {
    Value::String(hex::encode(b))
}

fn int(i: u64) -> Value {
    Value::Integer(i64::try_from(i).expect("vector integers fit i64"))
}

fn write(path: &Path, header: &str, t: &Table, force: bool) {
    if path.exists() && !force {
        eprintln!("kept (frozen): {}", path.display());
        return;
    }
    let body = toml::to_string(t).expect("tables serialize");
    fs::write(path, format!("{header}\n{body}")).expect("writable vectors directory");
    eprintln!("wrote {}", path.display());
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::A => "A",
        Role::B => "B",
        Role::Relay => "Relay",
    }
}

fn nonce(role: Role, seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[0] = role as u8;
    n[4..].copy_from_slice(&seq.to_be_bytes());
    n
}

fn messages(dir: &Path, seeds: &Path, force: bool) {
    fs::create_dir_all(dir).expect("mkdir");
    for s in samples::all() {
        let t = s.message.msg_type();
        let mut body = Vec::new();
        s.message.encode_body(&mut body).expect("a Vec grows");
        let mut tab = Table::new();
        tab.insert("message".into(), Value::String(t.name().into()));
        tab.insert("type".into(), int(u64::from(t.to_u8())));
        tab.insert("sealed".into(), Value::Boolean(s.key.is_some()));
        tab.insert(
            "role".into(),
            Value::String(role_name(s.envelope.role).into()),
        );
        tab.insert("key_id".into(), int(u64::from(s.envelope.key_id)));
        tab.insert("seq".into(), int(s.envelope.seq));
        tab.insert("txid".into(), int(u64::from(s.envelope.txid)));
        if let Some(e) = s.envelope.ephemeral {
            tab.insert("ephemeral".into(), hx(&e));
        }
        let datagram = match s.key {
            Some(k) => {
                tab.insert("key".into(), hx(&k));
                tab.insert("nonce".into(), hx(&nonce(s.envelope.role, s.envelope.seq)));
                s.message
                    .seal_to_vec(&s.envelope, &AeadKey::new(&SecretKey::from_bytes(k)))
                    .expect("samples fit")
            }
            None => {
                let mut out = vec![0u8; s.message.datagram_len(&s.envelope, false)];
                let n = s
                    .message
                    .encode_plain_into(&s.envelope, &mut out)
                    .expect("ERROR may be plain");
                out.truncate(n);
                out
            }
        };
        tab.insert("body".into(), hx(&body));
        tab.insert("datagram".into(), hx(&datagram));
        tab.insert(
            "fields".into(),
            Value::Table(form::table(&s.message.fields())),
        );
        let header = format!(
            "# NTMobile golden vector: {} (0x{:02x}). See vectors/README.md. Frozen: do not edit.",
            t.name(),
            t.to_u8()
        );
        write(&dir.join(format!("{}.toml", s.name)), &header, &tab, force);

        // Fuzz seeds: the same message sealed under the fuzz targets' fixed key.
        let fixed = AeadKey::new(&SecretKey::from_bytes(FIXED_KEY));
        let sealed = match s.key {
            Some(_) => s.message.seal_to_vec(&s.envelope, &fixed).expect("fits"),
            None => datagram.clone(),
        };
        let sel = MessageType::ALL
            .iter()
            .position(|&x| x == t)
            .expect("listed") as u8;
        let mut typed_body = vec![sel];
        typed_body.extend_from_slice(&body);
        let mut framed = stream::frame_prefix(sealed.len()).expect("fits").to_vec();
        framed.extend_from_slice(&sealed);
        for (target, bytes) in [
            ("datagram", &sealed),
            ("signaling_header", &sealed),
            ("message_body", &typed_body),
            ("stream_frames", &framed),
        ] {
            let d = seeds.join(target);
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join(s.name), bytes).expect("writable seeds");
        }
    }

    // The data packet.
    let key = [0x60u8; 32];
    let inner = hex::decode(
        "4500001c0001000040110000644002146440010a\
         c0de10e1000800003132",
    )
    .expect("hex");
    let mut pkt = vec![0u8; inner.len() + DATA_OVERHEAD];
    pkt[DATA_HEADER_LEN..DATA_HEADER_LEN + inner.len()].copy_from_slice(&inner);
    let n = seal_data(
        &AeadKey::new(&SecretKey::from_bytes(key)),
        0x1234_5678,
        42,
        true,
        &mut pkt,
        inner.len(),
    )
    .expect("sized");
    pkt.truncate(n);
    let mut tab = Table::new();
    tab.insert("key".into(), hx(&key));
    tab.insert("path_id".into(), int(0x1234_5678));
    tab.insert("counter".into(), int(42));
    tab.insert("key_phase".into(), Value::Boolean(true));
    let mut nonce = [0u8; 12];
    nonce[4..].copy_from_slice(&42u64.to_be_bytes());
    tab.insert("nonce".into(), hx(&nonce));
    tab.insert("inner".into(), hx(&inner));
    tab.insert("packet".into(), hx(&pkt));
    write(
        &dir.join("data.toml"),
        "# NTMobile golden vector: DATA packet (0x01), an IPv4/UDP virtual packet. Frozen.",
        &tab,
        force,
    );
    let mut fixed_pkt = vec![0u8; inner.len() + DATA_OVERHEAD];
    fixed_pkt[DATA_HEADER_LEN..DATA_HEADER_LEN + inner.len()].copy_from_slice(&inner);
    seal_data(
        &AeadKey::new(&SecretKey::from_bytes(FIXED_KEY)),
        0x1234_5678,
        42,
        true,
        &mut fixed_pkt,
        inner.len(),
    )
    .expect("sized");
    for target in ["datagram", "data_open"] {
        let d = seeds.join(target);
        fs::create_dir_all(&d).expect("mkdir");
        fs::write(d.join("data"), &fixed_pkt).expect("writable seeds");
    }
}

fn seq32(start: u8) -> [u8; 32] {
    let mut k = [0u8; 32];
    for (i, x) in k.iter_mut().enumerate() {
        *x = start.wrapping_add(i as u8);
    }
    k
}

fn crypto_vectors(dir: &Path, seeds: &Path, force: bool) {
    fs::create_dir_all(dir).expect("mkdir");
    let hdr =
        |what: &str| format!("# NTMobile golden vector: {what}. See spec/04-crypto.md. Frozen.");

    // Password → auth key.
    let salt = [0x5au8; 16];
    let auth = crypto::auth_key(b"correct horse battery staple", &salt, 100_000);
    let mut t = Table::new();
    t.insert(
        "password".into(),
        Value::String("correct horse battery staple".into()),
    );
    t.insert("salt".into(), hx(&salt));
    t.insert("iterations".into(), int(100_000));
    t.insert("auth_key".into(), hx(auth.expose()));
    write(
        &dir.join("auth_key.toml"),
        &hdr("password to auth key"),
        &t,
        force,
    );

    // Config key and login.
    let e_n = seq32(0x01);
    let s_as = seq32(0x21);
    let e_as = seq32(0x41);
    let (p_en, p_sas, p_eas) = (
        crypto::x25519_public(&e_n),
        crypto::x25519_public(&s_as),
        crypto::x25519_public(&e_as),
    );
    let dh_es = crypto::x25519(&e_n, &p_sas).expect("contributory");
    let dh_ee = crypto::x25519(&e_n, &p_eas).expect("contributory");
    let cfg = crypto::config_key(&dh_es, &p_en, &p_sas);
    let cfg_resp = crypto::config_response_key(&dh_es, &p_en, &p_sas, &p_eas);
    let challenge = [0xc4u8; 16];
    let th = crypto::login_transcript(&p_en, &p_eas, &challenge, 0x5eed_0001, b"alice@dc1.example");
    let lk = crypto::login_key(&dh_es, &dh_ee, &th);
    let proof = crypto::login_proof(&auth, &th);
    let mut t = Table::new();
    t.insert("node_ephemeral_secret".into(), hx(&e_n));
    t.insert("as_static_secret".into(), hx(&s_as));
    t.insert("as_ephemeral_secret".into(), hx(&e_as));
    t.insert("node_ephemeral_public".into(), hx(&p_en));
    t.insert("as_static_public".into(), hx(&p_sas));
    t.insert("as_ephemeral_public".into(), hx(&p_eas));
    t.insert("dh_es".into(), hx(dh_es.as_ref()));
    t.insert("dh_ee".into(), hx(dh_ee.as_ref()));
    t.insert("config_key".into(), hx(cfg.expose()));
    t.insert("config_response_key".into(), hx(cfg_resp.expose()));
    t.insert("challenge".into(), hx(&challenge));
    t.insert("login_id".into(), int(0x5eed_0001));
    t.insert("account".into(), Value::String("alice@dc1.example".into()));
    t.insert("auth_key".into(), hx(auth.expose()));
    t.insert("transcript".into(), hx(&th));
    t.insert("login_key".into(), hx(lk.expose()));
    t.insert("proof".into(), hx(&proof));
    write(
        &dir.join("login.toml"),
        &hdr("configuration and login keys, login proof"),
        &t,
        force,
    );

    // Keys derived from the node↔DC key.
    let ndc = SecretKey::from_bytes(seq32(0x10));
    let mut t = Table::new();
    t.insert("node_dc_key".into(), hx(ndc.expose()));
    t.insert("node_ns_key".into(), hx(crypto::node_ns_key(&ndc).expose()));
    t.insert("node_cs_key".into(), hx(crypto::node_cs_key(&ndc).expose()));
    write(
        &dir.join("node_derived_keys.toml"),
        &hdr("node-NS and node-CS keys"),
        &t,
        force,
    );

    // DC↔DC bootstrap.
    let (e_a, s_a, s_b) = (seq32(0x61), seq32(0x81), seq32(0xa1));
    let (p_ea, p_sa, p_sb) = (
        crypto::x25519_public(&e_a),
        crypto::x25519_public(&s_a),
        crypto::x25519_public(&s_b),
    );
    let es = crypto::x25519(&e_a, &p_sb).expect("contributory");
    let ss = crypto::x25519(&s_a, &p_sb).expect("contributory");
    let bk = crypto::dc_bootstrap_key(&es, &ss, &p_ea, &p_sa, &p_sb);
    let mut t = Table::new();
    t.insert("sender_ephemeral_secret".into(), hx(&e_a));
    t.insert("sender_static_secret".into(), hx(&s_a));
    t.insert("receiver_static_secret".into(), hx(&s_b));
    t.insert("sender_ephemeral_public".into(), hx(&p_ea));
    t.insert("sender_static_public".into(), hx(&p_sa));
    t.insert("receiver_static_public".into(), hx(&p_sb));
    t.insert("dh_es".into(), hx(es.as_ref()));
    t.insert("dh_ss".into(), hx(ss.as_ref()));
    t.insert("bootstrap_key".into(), hx(bk.expose()));
    write(
        &dir.join("dc_bootstrap.toml"),
        &hdr("DC-DC bootstrap key"),
        &t,
        force,
    );

    // Tunnel keys.
    let (ei, er) = (seq32(0xc1), seq32(0xe1));
    let (p_ei, p_er) = (crypto::x25519_public(&ei), crypto::x25519_public(&er));
    let dh = crypto::x25519(&ei, &p_er).expect("contributory");
    let cred = SecretKey::from_bytes(seq32(0x40));
    let tk = crypto::tunnel_keys(&dh, &cred, 0x1234_5678, &p_ei, &p_er);
    let mut t = Table::new();
    t.insert("initiator_ephemeral_secret".into(), hx(&ei));
    t.insert("responder_ephemeral_secret".into(), hx(&er));
    t.insert("initiator_ephemeral_public".into(), hx(&p_ei));
    t.insert("responder_ephemeral_public".into(), hx(&p_er));
    t.insert("tunnel_credential".into(), hx(cred.expose()));
    t.insert("path_id".into(), int(0x1234_5678));
    t.insert("dh_ee".into(), hx(dh.as_ref()));
    t.insert(
        "initiator_to_responder".into(),
        hx(tk.initiator_to_responder.expose()),
    );
    t.insert(
        "responder_to_initiator".into(),
        hx(tk.responder_to_initiator.expose()),
    );
    t.insert("control".into(), hx(tk.control.expose()));
    write(
        &dir.join("tunnel_keys.toml"),
        &hdr("end-to-end tunnel keys"),
        &t,
        force,
    );

    // Sealed box.
    let r = FIXED_BOX_SECRET;
    let eph = seq32(0x44);
    let plain = b"sensor 7: 21.5 C at 2026-11-21T09:00Z".to_vec();
    let boxed = crypto::seal_box(&crypto::x25519_public(&r), &eph, &plain).expect("contributory");
    let mut t = Table::new();
    t.insert("recipient_secret".into(), hx(&r));
    t.insert("recipient_public".into(), hx(&crypto::x25519_public(&r)));
    t.insert("ephemeral_secret".into(), hx(&eph));
    t.insert("plaintext".into(), hx(&plain));
    t.insert("sealed".into(), hx(&boxed));
    write(
        &dir.join("sealed_box.toml"),
        &hdr("sealed box to a static key"),
        &t,
        force,
    );
    let d = seeds.join("sealed_box");
    fs::create_dir_all(&d).expect("mkdir");
    fs::write(d.join("sealed_box"), &boxed).expect("writable seeds");

    // Replay window: a sequence of counters and what the window says to each.
    let mut w = ReplayWindow::new();
    let counters: Vec<u64> = vec![
        0, 1, 1, 5, 3, 3, 10_000, 1_809, 1_808, 10_000, 9_999, 20_000, 11_808,
    ];
    let results: Vec<Value> = counters
        .iter()
        .map(|&c| {
            Value::String(
                match w.accept(c) {
                    Ok(()) => "accept",
                    Err(ntm_wire::Replay::Duplicate) => "duplicate",
                    Err(ntm_wire::Replay::TooOld) => "too_old",
                    Err(ntm_wire::Replay::Exhausted) => "exhausted",
                }
                .into(),
            )
        })
        .collect();
    let mut t = Table::new();
    t.insert("window".into(), int(ReplayWindow::SIZE));
    t.insert(
        "counters".into(),
        Value::Array(counters.iter().map(|&c| int(c)).collect()),
    );
    t.insert("results".into(), Value::Array(results));
    write(
        &dir.join("replay_window.toml"),
        &hdr("replay window decisions"),
        &t,
        force,
    );
}

fn main() {
    let force = std::env::args().any(|a| a == "--force");
    let root = vectors::dir();
    let seeds = root.join("../fuzz/seeds");
    messages(&root.join("messages"), &seeds, force);
    crypto_vectors(&root.join("crypto"), &seeds, force);
}
