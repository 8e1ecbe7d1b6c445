//! Wire-format benchmark: decode and encode rates per message family, and data-packet seal+open
//! against raw AES-256-GCM on the same payload.
//!
//!     cargo bench -p vectors --bench wire
//!
//! Machines here are shared and noisy, so every comparison is a ratio measured in one run: the
//! baseline and the subject alternate in short rounds and the median of the per-round ratios is
//! reported. Absolute rates are printed for context and are single-core (this is one thread).
//! Set `NTM_BENCH_QUICK=1` for a short smoke run (what CI does).

use std::hint::black_box;
use std::time::{Duration, Instant};

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use ntm_wire::{
    open_data, open_signaling, seal_data, AeadKey, DataPacket, Message, MessageType, ReplayWindow,
    SecretKey, SignalingPacket, DATA_HEADER_LEN, DATA_OVERHEAD,
};
use vectors::samples;

fn quick() -> bool {
    std::env::var_os("NTM_BENCH_QUICK").is_some()
}

/// Nanoseconds per call of `f`, over a round of roughly `round` duration.
fn time_round(round: Duration, f: &mut dyn FnMut()) -> f64 {
    // Calibrate the batch so one timing covers about a tenth of the round.
    let mut batch = 1u64;
    loop {
        let t = Instant::now();
        for _ in 0..batch {
            f();
        }
        if t.elapsed() >= round / 10 || batch >= 1 << 30 {
            break;
        }
        batch *= 2;
    }
    let t = Instant::now();
    let mut n = 0u64;
    while t.elapsed() < round {
        for _ in 0..batch {
            f();
        }
        n += batch;
    }
    t.elapsed().as_nanos() as f64 / n as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// Median ns/op of `f` and `g` and the median of the per-round ratios g/f, alternating rounds.
fn compare(f: &mut dyn FnMut(), g: &mut dyn FnMut()) -> (f64, f64, f64) {
    let (rounds, round) = if quick() {
        (3, Duration::from_millis(20))
    } else {
        (15, Duration::from_millis(120))
    };
    let (mut a, mut b, mut r) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..rounds {
        let x = time_round(round, f);
        let y = time_round(round, g);
        a.push(x);
        b.push(y);
        r.push(y / x);
    }
    (median(a), median(b), median(r))
}

fn single(f: &mut dyn FnMut()) -> f64 {
    let (rounds, round) = if quick() {
        (3, Duration::from_millis(20))
    } else {
        (7, Duration::from_millis(100))
    };
    median((0..rounds).map(|_| time_round(round, f)).collect())
}

fn family(t: MessageType) -> &'static str {
    use MessageType::*;
    match t {
        ConfigRequest | ConfigResponse | LoginRequest | LoginResponse => "node-AS login",
        KeyDistribution => "key distribution",
        RegistrationRequest | RegistrationResponse | Keepalive | KeepaliveReply => {
            "registration/keep-alive"
        }
        DirectionRequest | RouteDirection | NtmInfoRequest | NtmInfoResponse => "direction",
        RelayRequest | RelayResponse | RelayBind => "relay",
        NotificationRegistration | NotificationSubscribe | Notification => "notification",
        TunnelRequest | TunnelResponse | PathUpdate | TunnelClose => "tunnel",
        CacheStore | CacheFetch | CacheData => "cache",
        Ack | Error => "ack/error",
    }
}

fn signaling() {
    println!("signaling, one core (ns/message; rate in million messages/s)");
    println!(
        "{:<26} {:>5} {:>9} {:>9} {:>9} {:>9}",
        "family", "bytes", "open+dec", "Mmsg/s", "body dec", "seal+enc"
    );
    // Per family: (sample, datagram bytes, open+decode ns, body decode ns, seal+encode ns).
    type Row = (String, usize, f64, f64, f64);
    let mut rows: Vec<(&str, Vec<Row>)> = Vec::new();
    let mut all_open = Vec::new();
    let mut all_body = Vec::new();
    for s in samples::all() {
        let Some(k) = s.key else { continue };
        let key = AeadKey::new(&SecretKey::from_bytes(k));
        let wire = s.message.seal_to_vec(&s.envelope, &key).expect("fits");
        let t = s.message.msg_type();
        let mut body = Vec::new();
        s.message.encode_body(&mut body).expect("grows");
        let mut buf = wire.clone();
        let open_ns = single(&mut || {
            buf.copy_from_slice(&wire);
            let r = open_signaling(black_box(&mut buf), &key);
            black_box(r.is_ok());
        });
        let body_ns = single(&mut || {
            black_box(Message::decode_body(t, black_box(&body)).is_ok());
        });
        let mut out = vec![0u8; wire.len()];
        let enc_ns = single(&mut || {
            black_box(
                s.message
                    .seal_into(&s.envelope, &key, black_box(&mut out))
                    .is_ok(),
            );
        });
        // The header check alone, for context.
        black_box(SignalingPacket::parse(&wire).is_ok());
        all_open.push(open_ns);
        all_body.push(body_ns);
        let fam = family(t);
        let row = (s.name.to_string(), wire.len(), open_ns, body_ns, enc_ns);
        match rows.iter_mut().find(|(f, _)| *f == fam) {
            Some((_, v)) => v.push(row),
            None => rows.push((fam, vec![row])),
        }
    }
    for (fam, v) in &rows {
        let n = v.len() as f64;
        let bytes = v.iter().map(|r| r.1).sum::<usize>() as f64 / n;
        let open = v.iter().map(|r| r.2).sum::<f64>() / n;
        let body = v.iter().map(|r| r.3).sum::<f64>() / n;
        let enc = v.iter().map(|r| r.4).sum::<f64>() / n;
        println!(
            "{:<26} {:>5.0} {:>9.0} {:>9.2} {:>9.0} {:>9.0}  ({} types)",
            fam,
            bytes,
            open,
            1e3 / open,
            body,
            enc,
            v.len()
        );
    }
    let mean_open = all_open.iter().sum::<f64>() / all_open.len() as f64;
    let mean_body = all_body.iter().sum::<f64>() / all_body.len() as f64;
    println!(
        "all message types: open+decode {:.2} M msg/s, body decode {:.2} M msg/s (target >= 2 M/s)",
        1e3 / mean_open,
        1e3 / mean_body
    );
}

fn data_path() {
    println!();
    println!("data packet seal+open vs raw AES-256-GCM encrypt+decrypt of the same payload");
    println!(
        "{:>6} {:>10} {:>10} {:>7}  target",
        "bytes", "raw ns", "ntm ns", "ratio"
    );
    let key_bytes = [0x42u8; 32];
    let raw = Aes256Gcm::new((&key_bytes).into());
    let key = AeadKey::new(&SecretKey::from_bytes(key_bytes));
    for size in [64usize, 512, 1400] {
        let inner: Vec<u8> = (0..size).map(|i| i as u8).collect();
        // Baseline: what any AES-GCM tunnel must do per packet (seal, then open, 16-byte AAD).
        let mut payload = inner.clone();
        let aad = [0u8; DATA_HEADER_LEN];
        let mut ctr = 0u64;
        let mut baseline = || {
            ctr += 1;
            let mut nonce = [0u8; 12];
            nonce[4..].copy_from_slice(&ctr.to_be_bytes());
            let n = Nonce::from_slice(&nonce);
            let tag = raw
                .encrypt_in_place_detached(n, &aad, black_box(&mut payload))
                .expect("small");
            let tag: Tag = tag;
            raw.decrypt_in_place_detached(n, &aad, black_box(&mut payload), &tag)
                .expect("own packet");
        };
        // Subject: the full NTMobile data path (header, seal, parse, replay check, open, accept).
        let mut pkt = vec![0u8; size + DATA_OVERHEAD];
        pkt[DATA_HEADER_LEN..DATA_HEADER_LEN + size].copy_from_slice(&inner);
        let mut window = ReplayWindow::new();
        let mut counter = 0u64;
        let mut subject = || {
            counter += 1;
            let n = seal_data(&key, 7, counter, false, black_box(&mut pkt), size).expect("sized");
            let p = DataPacket::parse(&pkt[..n]).expect("own header");
            let c = p.counter();
            window.check(c).expect("fresh");
            let r = open_data(&key, black_box(&mut pkt[..n])).expect("own packet");
            window.accept(c).expect("fresh");
            black_box(r);
        };
        let (a, b, ratio) = compare(&mut baseline, &mut subject);
        let target = if size == 1400 { "<= 1.15" } else { "" };
        println!("{size:>6} {a:>10.0} {b:>10.0} {ratio:>7.3}  {target}");
    }
}

fn main() {
    // `cargo bench` passes --bench; `cargo test --benches` passes nothing and expects a fast run.
    let benching = std::env::args().any(|a| a == "--bench");
    if !benching && !quick() {
        return;
    }
    signaling();
    data_path();
}
