//! WeChat's safe (encrypted) mode: a push carries its message as `Encrypt`, AES-256-CBC
//! under the account's EncodingAESKey, signed by `msg_signature` (SHA-1 over the sorted
//! token, timestamp, nonce and ciphertext, so unlike plain mode the signature covers the
//! message).
//!
//! The key is the EncodingAESKey (43 characters) read as base64; the IV is its first 16
//! bytes. The plaintext is 16 random bytes, the message length (4 bytes, big-endian), the
//! message, then the account's AppID, padded PKCS#7-style to a multiple of 32 bytes (not
//! AES's 16).

use aes::cipher::{BlockDecryptMut, BlockEncryptMut, KeyIvInit, block_padding::NoPadding};
use base64::Engine;
use base64::engine::{GeneralPurpose, GeneralPurposeConfig};
use sha1::{Digest, Sha1};

type Decryptor = cbc::Decryptor<aes::Aes256>;
type Encryptor = cbc::Encryptor<aes::Aes256>;

/// Block size of WeChat's padding.
const PAD_BLOCK: usize = 32;
/// Longest message accepted once decrypted; pushes are small XML documents.
const MAX_MESSAGE: usize = 1 << 20;

/// Standard base64 that accepts the non-zero trailing bits a random 43-character key
/// usually has.
const LENIENT: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_allow_trailing_bits(true),
);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SafeModeError {
    #[error("EncodingAESKey must be 43 base64 characters")]
    BadKey,
    #[error("Encrypt is not base64 of whole AES blocks")]
    BadCiphertext,
    #[error("decrypted message is malformed")]
    BadPlaintext,
    #[error("message is for another AppID")]
    WrongAppId,
}

/// An account's EncodingAESKey, decoded.
#[derive(Clone)]
pub struct AesKey([u8; 32]);

impl std::fmt::Debug for AesKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AesKey(..)")
    }
}

impl AesKey {
    pub fn from_encoding_aes_key(encoding_aes_key: &str) -> Result<Self, SafeModeError> {
        if encoding_aes_key.len() != 43 {
            return Err(SafeModeError::BadKey);
        }
        let bytes = LENIENT
            .decode(format!("{encoding_aes_key}="))
            .map_err(|_| SafeModeError::BadKey)?;
        Ok(Self(bytes.try_into().map_err(|_| SafeModeError::BadKey)?))
    }

    fn iv(&self) -> [u8; 16] {
        let mut iv = [0; 16];
        iv.copy_from_slice(&self.0[..16]);
        iv
    }
}

/// The `msg_signature` WeChat puts on an encrypted push.
pub fn msg_signature(token: &str, timestamp: &str, nonce: &str, encrypted: &str) -> String {
    let mut parts = [token, timestamp, nonce, encrypted];
    parts.sort_unstable();
    hex::encode(Sha1::digest(parts.concat().as_bytes()))
}

/// The message inside `encrypted` (base64), if it decrypts and names `app_id`.
pub fn decrypt(key: &AesKey, app_id: &str, encrypted: &str) -> Result<String, SafeModeError> {
    let mut data = base64::engine::general_purpose::STANDARD
        .decode(encrypted.trim())
        .map_err(|_| SafeModeError::BadCiphertext)?;
    if data.is_empty() || !data.len().is_multiple_of(16) {
        return Err(SafeModeError::BadCiphertext);
    }
    let plain = Decryptor::new(&key.0.into(), &key.iv().into())
        .decrypt_padded_mut::<NoPadding>(&mut data)
        .map_err(|_| SafeModeError::BadCiphertext)?;
    let pad = usize::from(*plain.last().ok_or(SafeModeError::BadPlaintext)?);
    if !(1..=PAD_BLOCK).contains(&pad) || pad > plain.len() {
        return Err(SafeModeError::BadPlaintext);
    }
    let plain = &plain[..plain.len() - pad];
    let length: [u8; 4] = plain
        .get(16..20)
        .and_then(|b| b.try_into().ok())
        .ok_or(SafeModeError::BadPlaintext)?;
    let length = u32::from_be_bytes(length) as usize;
    if length > MAX_MESSAGE {
        return Err(SafeModeError::BadPlaintext);
    }
    let message = plain.get(20..20 + length).ok_or(SafeModeError::BadPlaintext)?;
    let sender = &plain[20 + length..];
    // Not secret, but compared whole: a prefix of the AppID is another account.
    if sender != app_id.as_bytes() {
        return Err(SafeModeError::WrongAppId);
    }
    String::from_utf8(message.to_vec()).map_err(|_| SafeModeError::BadPlaintext)
}

/// `message` encrypted as WeChat encrypts a push (for a passive reply, and for tests that
/// play WeChat); `random` is the 16-byte prefix.
pub fn encrypt(key: &AesKey, app_id: &str, message: &str, random: [u8; 16]) -> String {
    let mut plain = Vec::with_capacity(20 + message.len() + app_id.len() + PAD_BLOCK);
    plain.extend_from_slice(&random);
    plain.extend_from_slice(&(message.len() as u32).to_be_bytes());
    plain.extend_from_slice(message.as_bytes());
    plain.extend_from_slice(app_id.as_bytes());
    let pad = PAD_BLOCK - plain.len() % PAD_BLOCK;
    plain.resize(plain.len() + pad, pad as u8);
    let length = plain.len();
    let cipher = Encryptor::new(&key.0.into(), &key.iv().into())
        .encrypt_padded_mut::<NoPadding>(&mut plain, length)
        // The length is a multiple of the block size, so this cannot fail.
        .unwrap_or_else(|_| unreachable!())
        .to_vec();
    base64::engine::general_purpose::STANDARD.encode(cipher)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A key whose last character has non-zero trailing bits, as most real keys do.
    const KEY: &str = "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFG";

    fn key() -> AesKey {
        AesKey::from_encoding_aes_key(KEY).expect("43 characters")
    }

    #[test]
    fn keys_are_43_base64_characters() {
        assert!(AesKey::from_encoding_aes_key(&KEY[..42]).is_err());
        assert!(AesKey::from_encoding_aes_key(&format!("{}!", &KEY[..42])).is_err());
        assert_eq!(key().iv(), key().0[..16]);
    }

    #[test]
    fn round_trips_and_pads_to_32_bytes() {
        for message in ["", "<xml>短</xml>", &"長".repeat(100)] {
            let encrypted = encrypt(&key(), "wx1234567890abcdef", message, [7; 16]);
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(&encrypted)
                .expect("base64");
            assert_eq!(bytes.len() % PAD_BLOCK, 0);
            assert_eq!(
                decrypt(&key(), "wx1234567890abcdef", &encrypted).as_deref(),
                Ok(message)
            );
        }
    }

    #[test]
    fn refuses_another_app_a_wrong_key_and_garbage() {
        let encrypted = encrypt(&key(), "wxA", "<xml/>", [1; 16]);
        assert_eq!(decrypt(&key(), "wxB", &encrypted), Err(SafeModeError::WrongAppId));
        assert_eq!(decrypt(&key(), "wx", &encrypted), Err(SafeModeError::WrongAppId));
        let other = AesKey::from_encoding_aes_key("ZYXWVUTSRQPONMLKJIHGFEDCBA9876543210zyxwvut")
            .expect("43 characters");
        assert!(decrypt(&other, "wxA", &encrypted).is_err());
        assert_eq!(
            decrypt(&key(), "wxA", "not base64!"),
            Err(SafeModeError::BadCiphertext)
        );
        assert_eq!(decrypt(&key(), "wxA", "AAAA"), Err(SafeModeError::BadCiphertext));
        assert_eq!(decrypt(&key(), "wxA", ""), Err(SafeModeError::BadCiphertext));
    }

    #[test]
    fn msg_signature_covers_the_ciphertext() {
        let expected = hex::encode(Sha1::digest(b"1700000000ENCRYPTEDnoncetoken"));
        assert_eq!(
            msg_signature("token", "1700000000", "nonce", "ENCRYPTED"),
            expected
        );
        assert_ne!(msg_signature("token", "1700000000", "nonce", "OTHER"), expected);
    }

    mod properties {
        use proptest::prelude::*;

        use super::super::*;

        proptest! {
            /// Whatever arrives as `Encrypt`, decrypting never panics.
            #[test]
            fn any_ciphertext_decrypts_or_is_refused(data in proptest::collection::vec(any::<u8>(), 0..200)) {
                let key = super::key();
                let _ = decrypt(&key, "wxA", &base64::engine::general_purpose::STANDARD.encode(data));
            }

            #[test]
            fn any_message_round_trips(message in ".{0,300}", random in any::<[u8; 16]>()) {
                let key = super::key();
                let encrypted = encrypt(&key, "wxA", &message, random);
                prop_assert_eq!(decrypt(&key, "wxA", &encrypted), Ok(message));
            }
        }
    }
}
