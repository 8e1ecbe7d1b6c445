//! Cryptographic constructions (spec/04-crypto.md). AES-256-GCM for every envelope, HKDF-SHA256
//! and HMAC-SHA256 for derivation and proofs, PBKDF2-HMAC-SHA256 for the password, X25519 for
//! ephemeral agreement.
//!
//! Randomness never originates here: every ephemeral secret, salt and challenge is an argument,
//! produced by the caller's (seeded or OS) generator. Keys live in [`SecretKey`] or
//! [`AeadKey`], both wiped on drop; secret comparisons go through `subtle`.

use aes_gcm::aead::{AeadInPlace, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::codec::SecretKey;
use crate::error::WireError;

/// Bytes of an AES-GCM authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes of an AES-GCM nonce.
pub const NONCE_LEN: usize = 12;

/// Domain-separation labels. Every derivation names its purpose and the protocol version, so no
/// two constructions can ever produce the same key from the same input.
pub mod label {
    pub const CONFIG: &[u8] = b"ntm v1 config";
    pub const AUTH: &[u8] = b"ntm v1 auth";
    pub const LOGIN_TRANSCRIPT: &[u8] = b"ntm v1 login transcript";
    pub const LOGIN_KEY: &[u8] = b"ntm v1 login key";
    pub const LOGIN_PROOF: &[u8] = b"ntm v1 login proof";
    pub const NODE_NS: &[u8] = b"ntm v1 node-ns";
    pub const NODE_CS: &[u8] = b"ntm v1 node-cs";
    pub const DC_BOOTSTRAP: &[u8] = b"ntm v1 dc bootstrap";
    pub const TUNNEL_TRANSCRIPT: &[u8] = b"ntm v1 tunnel transcript";
    pub const DATA_I2R: &[u8] = b"ntm v1 data i2r";
    pub const DATA_R2I: &[u8] = b"ntm v1 data r2i";
    pub const TUNNEL_CONTROL: &[u8] = b"ntm v1 tunnel control";
    pub const SEALED_BOX: &[u8] = b"ntm v1 sealed box";
}

/// An expanded AES-256-GCM key, ready to seal and open. Its key schedule is wiped on drop.
#[derive(Clone)]
pub struct AeadKey {
    cipher: Aes256Gcm,
}

impl AeadKey {
    pub fn new(key: &SecretKey) -> Self {
        AeadKey {
            cipher: Aes256Gcm::new(key.expose().into()),
        }
    }

    /// Encrypts `buf` in place and returns the tag. Never fails for inputs under 2^36 bytes,
    /// which every caller's length field already guarantees.
    pub(crate) fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; 16] {
        match self
            .cipher
            .encrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf)
        {
            Ok(tag) => tag.into(),
            // aes-gcm only fails on plaintexts longer than 2^36 - 32 bytes; our buffers are
            // bounded by u16 length fields (signaling) or by the caller's slice (data), far below.
            Err(_) => [0u8; 16],
        }
    }

    /// Decrypts `buf` in place after verifying `tag`; on failure `buf` is left unspecified.
    pub(crate) fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), WireError> {
        self.cipher
            .decrypt_in_place_detached(Nonce::from_slice(nonce), aad, buf, Tag::from_slice(tag))
            .map_err(|_| WireError::AuthenticationFailed)
    }
}

impl core::fmt::Debug for AeadKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("AeadKey(..)")
    }
}

type HmacSha256 = Hmac<Sha256>;

fn hmac_parts(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length; `new_from_slice` cannot fail for HMAC.
    let mut mac = match <HmacSha256 as Mac>::new_from_slice(key) {
        Ok(m) => m,
        Err(_) => return [0u8; 32],
    };
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// HKDF-SHA256 (RFC 5869) with a 32-byte output; `info` is the concatenation of `info_parts`.
pub fn hkdf_sha256(salt: &[u8], ikm: &[u8], info_parts: &[&[u8]]) -> SecretKey {
    let hk = Hkdf::<Sha256>::new(Some(salt), ikm);
    let mut okm = Zeroizing::new([0u8; 32]);
    // 32 bytes is far below HKDF-SHA256's 255 * 32 limit, so expand cannot fail.
    let _ = hk.expand_multi_info(info_parts, okm.as_mut());
    SecretKey::from_bytes(*okm)
}

/// The X25519 public key of a 32-byte secret (clamped per RFC 7748).
pub fn x25519_public(secret: &[u8; 32]) -> [u8; 32] {
    let s = x25519_dalek::StaticSecret::from(*secret);
    x25519_dalek::PublicKey::from(&s).to_bytes()
}

/// X25519 agreement. Rejects an all-zero result, which a low-order peer key produces.
pub fn x25519(secret: &[u8; 32], peer_public: &[u8; 32]) -> Result<Zeroizing<[u8; 32]>, WireError> {
    let s = x25519_dalek::StaticSecret::from(*secret);
    let shared = s.diffie_hellman(&x25519_dalek::PublicKey::from(*peer_public));
    if !shared.was_contributory() {
        return Err(WireError::NonContributoryKey);
    }
    Ok(Zeroizing::new(shared.to_bytes()))
}

/// Node↔AS configuration request key: `HKDF(salt = "ntm v1 config", ikm = DH(e_node, S_as),
/// info = E_node || S_as)`. Protects CONFIG_REQUEST.
pub fn config_key(dh_es: &[u8; 32], node_ephemeral: &[u8; 32], as_static: &[u8; 32]) -> SecretKey {
    hkdf_sha256(label::CONFIG, dh_es, &[node_ephemeral, as_static])
}

/// Node↔AS configuration response key: `HKDF(salt = "ntm v1 config", ikm = DH(e_node, S_as),
/// info = E_node || S_as || E_as)`. Protects CONFIG_RESPONSE. The AS's fresh ephemeral in the info
/// gives every response its own key, so even a replayed CONFIG_REQUEST can never make the AS seal
/// two different responses under one key and nonce.
pub fn config_response_key(
    dh_es: &[u8; 32],
    node_ephemeral: &[u8; 32],
    as_static: &[u8; 32],
    as_ephemeral: &[u8; 32],
) -> SecretKey {
    hkdf_sha256(
        label::CONFIG,
        dh_es,
        &[node_ephemeral, as_static, as_ephemeral],
    )
}

/// The password-derived authentication key the AS stores as its verifier:
/// `HMAC(PBKDF2-HMAC-SHA256(password, salt, iterations, 32), "ntm v1 auth")`.
pub fn auth_key(password: &[u8], salt: &[u8; 16], iterations: u32) -> SecretKey {
    let mut stretched = Zeroizing::new([0u8; 32]);
    pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations.max(1), stretched.as_mut());
    SecretKey::from_bytes(hmac_parts(stretched.as_ref(), &[label::AUTH]))
}

/// The login transcript hash: `SHA-256("ntm v1 login transcript" || E_node || E_as || challenge ||
/// login_id (4, BE) || len(account) (1) || account)`.
pub fn login_transcript(
    node_ephemeral: &[u8; 32],
    as_ephemeral: &[u8; 32],
    challenge: &[u8; 16],
    login_id: u32,
    account: &[u8],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(label::LOGIN_TRANSCRIPT);
    h.update(node_ephemeral);
    h.update(as_ephemeral);
    h.update(challenge);
    h.update(login_id.to_be_bytes());
    h.update([account.len().min(255) as u8]);
    h.update(account);
    h.finalize().into()
}

/// The login key: `HKDF(salt = transcript, ikm = DH(e_node, S_as) || DH(e_node, E_as),
/// info = "ntm v1 login key")`. The second agreement gives forward secrecy against a later
/// compromise of the AS's static key.
pub fn login_key(dh_es: &[u8; 32], dh_ee: &[u8; 32], transcript: &[u8; 32]) -> SecretKey {
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(dh_es);
    ikm[32..].copy_from_slice(dh_ee);
    hkdf_sha256(transcript, ikm.as_ref(), &[label::LOGIN_KEY])
}

/// The node's proof of the password: `HMAC(auth_key, "ntm v1 login proof" || transcript)`.
pub fn login_proof(auth_key: &SecretKey, transcript: &[u8; 32]) -> [u8; 32] {
    hmac_parts(auth_key.expose(), &[label::LOGIN_PROOF, transcript])
}

/// Checks a login proof in constant time.
pub fn verify_login_proof(auth_key: &SecretKey, transcript: &[u8; 32], proof: &[u8; 32]) -> bool {
    login_proof(auth_key, transcript).ct_eq(proof).into()
}

/// The key a node shares with its notification server, derived from the node↔DC key so the DC can
/// hand it to the NS without the node's involvement: `HKDF(salt = "", ikm = K_node_dc,
/// info = "ntm v1 node-ns")`.
pub fn node_ns_key(node_dc: &SecretKey) -> SecretKey {
    hkdf_sha256(&[], node_dc.expose(), &[label::NODE_NS])
}

/// The key a node shares with its cache server: `HKDF(salt = "", ikm = K_node_dc,
/// info = "ntm v1 node-cs")`.
pub fn node_cs_key(node_dc: &SecretKey) -> SecretKey {
    hkdf_sha256(&[], node_dc.expose(), &[label::NODE_CS])
}

/// DC↔DC bootstrap key for the first KEY_DISTRIBUTION between two DCs:
/// `HKDF(salt = "ntm v1 dc bootstrap", ikm = DH(e_a, S_b) || DH(s_a, S_b),
/// info = E_a || S_a || S_b)`. The static-static term authenticates the sender, the
/// ephemeral-static term makes every bootstrap key fresh.
pub fn dc_bootstrap_key(
    dh_es: &[u8; 32],
    dh_ss: &[u8; 32],
    sender_ephemeral: &[u8; 32],
    sender_static: &[u8; 32],
    receiver_static: &[u8; 32],
) -> SecretKey {
    let mut ikm = Zeroizing::new([0u8; 64]);
    ikm[..32].copy_from_slice(dh_es);
    ikm[32..].copy_from_slice(dh_ss);
    hkdf_sha256(
        label::DC_BOOTSTRAP,
        ikm.as_ref(),
        &[sender_ephemeral, sender_static, receiver_static],
    )
}

/// The keys of one tunnel, agreed end to end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TunnelKeys {
    /// Data sent by the tunnel initiator (the sender of the TUNNEL_REQUEST).
    pub initiator_to_responder: SecretKey,
    /// Data sent by the responder.
    pub responder_to_initiator: SecretKey,
    /// PATH_UPDATE, TUNNEL_CLOSE and peer KEEPALIVE between the two nodes.
    pub control: SecretKey,
}

/// Derives a tunnel's keys from the ephemeral agreement and the DC-issued tunnel credential (for
/// a rekey, pass the current control key instead of the credential, so that a DC that knows the
/// credential cannot interpose on later generations):
/// `th = SHA-256("ntm v1 tunnel transcript" || path_id (4, BE) || E_i || E_r)`,
/// `prk = HKDF-Extract(salt = K_tun, ikm = DH(e_i, e_r))`, then three HKDF-Expand outputs with
/// info `label || th`. A DC or RS that knows `K_tun` but only records traffic cannot compute them.
pub fn tunnel_keys(
    dh_ee: &[u8; 32],
    tunnel_credential: &SecretKey,
    path_id: u32,
    initiator_ephemeral: &[u8; 32],
    responder_ephemeral: &[u8; 32],
) -> TunnelKeys {
    let mut h = Sha256::new();
    h.update(label::TUNNEL_TRANSCRIPT);
    h.update(path_id.to_be_bytes());
    h.update(initiator_ephemeral);
    h.update(responder_ephemeral);
    let th: [u8; 32] = h.finalize().into();
    let salt = tunnel_credential.expose();
    TunnelKeys {
        initiator_to_responder: hkdf_sha256(salt, dh_ee, &[label::DATA_I2R, &th]),
        responder_to_initiator: hkdf_sha256(salt, dh_ee, &[label::DATA_R2I, &th]),
        control: hkdf_sha256(salt, dh_ee, &[label::TUNNEL_CONTROL, &th]),
    }
}

/// Bytes a sealed box adds to its plaintext: the ephemeral public key and the tag.
pub const SEALED_BOX_OVERHEAD: usize = 32 + TAG_LEN;

fn sealed_box_key(dh: &[u8; 32], ephemeral: &[u8; 32], recipient: &[u8; 32]) -> AeadKey {
    AeadKey::new(&hkdf_sha256(label::SEALED_BOX, dh, &[ephemeral, recipient]))
}

/// Seals `plaintext` to a recipient's static X25519 public key (cache blobs for offline nodes):
/// `E || AES-256-GCM(k, nonce = 0, aad = E || R, plaintext)` with
/// `k = HKDF(salt = "ntm v1 sealed box", ikm = DH(e, R), info = E || R)`. Each box has its own
/// ephemeral `e`, hence its own key, so the fixed nonce is never reused under one key.
pub fn seal_box(
    recipient_public: &[u8; 32],
    ephemeral_secret: &[u8; 32],
    plaintext: &[u8],
) -> Result<Vec<u8>, WireError> {
    let e_pub = x25519_public(ephemeral_secret);
    let dh = x25519(ephemeral_secret, recipient_public)?;
    let key = sealed_box_key(&dh, &e_pub, recipient_public);
    let mut out = Vec::with_capacity(plaintext.len() + SEALED_BOX_OVERHEAD);
    out.extend_from_slice(&e_pub);
    out.extend_from_slice(plaintext);
    let mut aad = [0u8; 64];
    aad[..32].copy_from_slice(&e_pub);
    aad[32..].copy_from_slice(recipient_public);
    let tag = key.seal(&[0u8; NONCE_LEN], &aad, &mut out[32..]);
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Opens a sealed box with the recipient's static secret.
pub fn open_box(recipient_secret: &[u8; 32], sealed: &[u8]) -> Result<Vec<u8>, WireError> {
    if sealed.len() < SEALED_BOX_OVERHEAD {
        return Err(WireError::AuthenticationFailed);
    }
    let mut e_pub = [0u8; 32];
    e_pub.copy_from_slice(&sealed[..32]);
    let recipient_public = x25519_public(recipient_secret);
    let dh = x25519(recipient_secret, &e_pub)?;
    let key = sealed_box_key(&dh, &e_pub, &recipient_public);
    let body_end = sealed.len() - TAG_LEN;
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&sealed[body_end..]);
    let mut plain = sealed[32..body_end].to_vec();
    let mut aad = [0u8; 64];
    aad[..32].copy_from_slice(&e_pub);
    aad[32..].copy_from_slice(&recipient_public);
    key.open(&[0u8; NONCE_LEN], &aad, &mut plain, &tag)?;
    Ok(plain)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(b: u8) -> SecretKey {
        SecretKey::from_bytes([b; 32])
    }

    #[test]
    fn a_login_proof_verifies_only_with_the_right_password() {
        let salt = [7u8; 16];
        let good = auth_key(b"correct horse", &salt, 1000);
        let bad = auth_key(b"correct horsf", &salt, 1000);
        let t = login_transcript(&[1; 32], &[2; 32], &[3; 16], 9, b"alice");
        let proof = login_proof(&good, &t);
        assert!(verify_login_proof(&good, &t, &proof));
        assert!(!verify_login_proof(&bad, &t, &proof));
        let other_t = login_transcript(&[1; 32], &[2; 32], &[4; 16], 9, b"alice");
        assert!(!verify_login_proof(&good, &other_t, &proof));
    }

    #[test]
    fn both_tunnel_ends_derive_the_same_keys_and_each_direction_differs() {
        let (ei, er) = ([0x11u8; 32], [0x22u8; 32]);
        let (pi, pr) = (x25519_public(&ei), x25519_public(&er));
        let at_i = tunnel_keys(&x25519(&ei, &pr).unwrap(), &k(5), 42, &pi, &pr);
        let at_r = tunnel_keys(&x25519(&er, &pi).unwrap(), &k(5), 42, &pi, &pr);
        assert_eq!(at_i, at_r);
        assert_ne!(at_i.initiator_to_responder, at_i.responder_to_initiator);
        assert_ne!(at_i.control, at_i.initiator_to_responder);
        let other_cred = tunnel_keys(&x25519(&ei, &pr).unwrap(), &k(6), 42, &pi, &pr);
        assert_ne!(at_i, other_cred);
    }

    #[test]
    fn every_config_response_has_its_own_key() {
        let dh = [1u8; 32];
        let req = config_key(&dh, &[2; 32], &[3; 32]);
        let r1 = config_response_key(&dh, &[2; 32], &[3; 32], &[4; 32]);
        let r2 = config_response_key(&dh, &[2; 32], &[3; 32], &[5; 32]);
        assert_ne!(r1, r2);
        assert_ne!(r1, req);
    }

    #[test]
    fn a_low_order_public_key_is_refused() {
        assert_eq!(
            x25519(&[9u8; 32], &[0u8; 32]).unwrap_err(),
            WireError::NonContributoryKey
        );
    }

    #[test]
    fn a_sealed_box_opens_for_its_recipient_only() {
        let r = [0x33u8; 32];
        let boxed = seal_box(&x25519_public(&r), &[0x44; 32], b"hello offline node").unwrap();
        assert_eq!(open_box(&r, &boxed).unwrap(), b"hello offline node");
        assert_eq!(
            open_box(&[0x34u8; 32], &boxed).unwrap_err(),
            WireError::AuthenticationFailed
        );
        let mut tampered = boxed.clone();
        tampered[40] ^= 1;
        assert!(open_box(&r, &tampered).is_err());
        assert!(open_box(&r, &boxed[..SEALED_BOX_OVERHEAD - 1]).is_err());
    }
}
