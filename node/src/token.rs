//! Session tokens: `fc1.<claims>.<signature>`, base64url without padding.
//!
//! The claims are the user id, the session id and the expiry (three u64,
//! big-endian); the signature is HMAC-SHA256 over `fc1.<claims>` with the
//! cluster's token key, so any node checks a token without a lookup. A token
//! can still be revoked before it expires: the user's shard keeps revoked
//! session ids, and every request checks there (see `chat.rs`).

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use fishchat_shard::UserId;
use ring::hmac;

const PREFIX: &str = "fc1.";
const CLAIMS_BYTES: usize = 24;

/// What a valid token says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Claims {
    /// Whose session it is.
    pub user: UserId,
    /// Which session of theirs.
    pub session: u64,
    /// When it stops being valid, ms since the Unix epoch.
    pub expires_ms: u64,
}

/// Why a string is not a token of this cluster.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// Not in the token format.
    #[error("not a session token")]
    Malformed,
    /// Well-formed, but not signed with this cluster's key.
    #[error("the token's signature is not this cluster's")]
    BadSignature,
}

/// Signs and checks tokens with the cluster's key.
pub struct TokenKey(hmac::Key);

impl TokenKey {
    /// A key from the cluster's secret bytes.
    pub fn new(secret: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, secret))
    }

    /// The token for `claims`.
    pub fn sign(&self, claims: Claims) -> String {
        let mut raw = [0u8; CLAIMS_BYTES];
        raw[..8].copy_from_slice(&claims.user.to_be_bytes());
        raw[8..16].copy_from_slice(&claims.session.to_be_bytes());
        raw[16..].copy_from_slice(&claims.expires_ms.to_be_bytes());
        let signed = format!("{PREFIX}{}", URL_SAFE_NO_PAD.encode(raw));
        let tag = hmac::sign(&self.0, signed.as_bytes());
        format!("{signed}.{}", URL_SAFE_NO_PAD.encode(tag.as_ref()))
    }

    /// The claims of `token` if this cluster signed it. Expiry is the
    /// caller's to check.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let (signed, tag) = token.rsplit_once('.').ok_or(TokenError::Malformed)?;
        let claims = signed.strip_prefix(PREFIX).ok_or(TokenError::Malformed)?;
        let tag = URL_SAFE_NO_PAD
            .decode(tag)
            .map_err(|_| TokenError::Malformed)?;
        let raw = URL_SAFE_NO_PAD
            .decode(claims)
            .map_err(|_| TokenError::Malformed)?;
        let raw: [u8; CLAIMS_BYTES] = raw.try_into().map_err(|_| TokenError::Malformed)?;
        hmac::verify(&self.0, signed.as_bytes(), &tag).map_err(|_| TokenError::BadSignature)?;
        let word = |i: usize| {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&raw[i..i + 8]);
            u64::from_be_bytes(bytes)
        };
        Ok(Claims {
            user: word(0),
            session: word(8),
            expires_ms: word(16),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_carries_its_claims_and_only_this_key_accepts_it() {
        let key = TokenKey::new(b"0123456789abcdef0123456789abcdef");
        let claims = Claims {
            user: 17,
            session: u64::MAX - 3,
            expires_ms: 1_800_000_000_000,
        };
        let token = key.sign(claims);
        assert!(token.is_ascii() && token.len() < 1024);
        assert_eq!(key.verify(&token), Ok(claims));

        let other = TokenKey::new(b"another cluster's secret key....");
        assert_eq!(other.verify(&token), Err(TokenError::BadSignature));

        // Changing one claim character breaks the signature.
        let mut forged = token.clone().into_bytes();
        forged[5] = if forged[5] == b'A' { b'B' } else { b'A' };
        let forged = String::from_utf8(forged).expect("ascii");
        assert!(key.verify(&forged).is_err());
    }

    #[test]
    fn garbage_is_malformed() {
        let key = TokenKey::new(b"0123456789abcdef");
        for garbage in ["", "fc1.", "fc1..", "x.y.z", "fc1.AAAA.AAAA", "fc1.!!.!!"] {
            assert_eq!(
                key.verify(garbage),
                Err(TokenError::Malformed),
                "{garbage:?}"
            );
        }
    }
}
