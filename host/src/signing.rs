//! Publisher keys: an author signs a component's digest with an ed25519 key; an admin trusts the
//! publisher's public key; the host then allows every component whose signature verifies against
//! a trusted key, without allowing each digest by hand.
//!
//! Files (one line each, text): `<name>.key` = `kiln-ed25519-secret <hex>` (mode 0600),
//! `<name>.pub` = `kiln-ed25519-public <hex>`, and `<file.wasm>.sig` =
//! `kiln-ed25519-signature <public key hex> <signed digest> <signature hex>`. The signature is
//! over the digest's text (`sha256:<hex>`); the `.sig` names the key and the digest it signed, so
//! a refusal can say which of "changed after signing", "not signed by the key it names" and
//! "signed by a key nobody trusts" happened.

use anyhow::{bail, Context};
use ed25519_dalek::{Signature, Signer, SigningKey, Verifier, VerifyingKey};

const SECRET: &str = "kiln-ed25519-secret";
const PUBLIC: &str = "kiln-ed25519-public";
const SIGNATURE: &str = "kiln-ed25519-signature";

/// A new key pair: (secret file text, public file text).
pub fn keygen() -> (String, String) {
    let key = SigningKey::from_bytes(&rand::random::<[u8; 32]>());
    (
        format!("{SECRET} {}\n", hex::encode(key.to_bytes())),
        format!("{PUBLIC} {}\n", hex::encode(key.verifying_key().to_bytes())),
    )
}

fn field<'a>(text: &'a str, tag: &str, what: &str) -> anyhow::Result<Vec<&'a str>> {
    let mut parts = text.split_whitespace();
    if parts.next() != Some(tag) {
        bail!("not a {what} (expected a line starting with `{tag}`)");
    }
    Ok(parts.collect())
}

fn bytes32(hex_text: &str, what: &str) -> anyhow::Result<[u8; 32]> {
    hex::decode(hex_text)
        .ok()
        .and_then(|b| b.try_into().ok())
        .with_context(|| format!("{what}: expected 64 hex digits"))
}

/// A public key from a `.pub` file's text.
pub fn parse_public(text: &str) -> anyhow::Result<[u8; 32]> {
    let parts = field(text, PUBLIC, "Kiln public key")?;
    let key = bytes32(parts.first().copied().unwrap_or(""), "public key")?;
    VerifyingKey::from_bytes(&key).context("not a valid ed25519 public key")?;
    Ok(key)
}

/// Signs `digest` (`sha256:<hex>`) with a `.key` file's text; returns the `.sig` file's text.
pub fn sign(secret_text: &str, digest: &str) -> anyhow::Result<String> {
    let parts = field(secret_text, SECRET, "Kiln secret key")?;
    let key = SigningKey::from_bytes(&bytes32(
        parts.first().copied().unwrap_or(""),
        "secret key",
    )?);
    let signature = key.sign(digest.as_bytes());
    Ok(format!(
        "{SIGNATURE} {} {digest} {}\n",
        hex::encode(key.verifying_key().to_bytes()),
        hex::encode(signature.to_bytes())
    ))
}

/// A short, stable name for a public key in messages: `ed25519:<first 16 hex digits>`.
pub fn fingerprint(key: &[u8; 32]) -> String {
    format!("ed25519:{}", &hex::encode(key)[..16])
}

/// A parsed `.sig` file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PluginSignature {
    pub public_key: [u8; 32],
    pub digest: String,
    signature: [u8; 64],
}

impl PluginSignature {
    pub fn parse(text: &str) -> anyhow::Result<PluginSignature> {
        let parts = field(text, SIGNATURE, "Kiln plugin signature")?;
        let [key, digest, signature] = parts[..] else {
            bail!("a Kiln plugin signature has a public key, a digest and a signature");
        };
        let signature: [u8; 64] = hex::decode(signature)
            .ok()
            .and_then(|b| b.try_into().ok())
            .context("signature: expected 128 hex digits")?;
        Ok(PluginSignature {
            public_key: bytes32(key, "public key")?,
            digest: digest.to_owned(),
            signature,
        })
    }

    /// Checks this signature for the component `digest` against the `trusted` keys (name, key):
    /// the publisher's name, or why not.
    pub fn verify<'a>(
        &self,
        digest: &str,
        trusted: impl IntoIterator<Item = (&'a str, &'a [u8; 32])>,
    ) -> Result<String, String> {
        if self.digest != digest {
            return Err(format!(
                "its signature is for {}, not for this component ({digest}): it was changed after \
                 signing",
                self.digest
            ));
        }
        let valid = VerifyingKey::from_bytes(&self.public_key)
            .map(|key| {
                key.verify(digest.as_bytes(), &Signature::from_bytes(&self.signature))
                    .is_ok()
            })
            .unwrap_or(false);
        if !valid {
            return Err(format!(
                "its signature was not made by the key it names ({}): signed by another key",
                fingerprint(&self.public_key)
            ));
        }
        trusted
            .into_iter()
            .find(|(_, key)| **key == self.public_key)
            .map(|(name, _)| name.to_owned())
            .ok_or_else(|| {
                format!(
                    "it is signed by {}, a key no admin trusts",
                    fingerprint(&self.public_key)
                )
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_verifies_only_for_its_component_its_key_and_a_trusted_key() {
        let (secret, public) = keygen();
        let key = parse_public(&public).unwrap();
        let digest = format!("sha256:{}", "ab".repeat(32));
        let sig = PluginSignature::parse(&sign(&secret, &digest).unwrap()).unwrap();
        assert_eq!(sig.verify(&digest, [("acme", &key)]), Ok("acme".into()));

        let other = format!("sha256:{}", "cd".repeat(32));
        assert!(sig
            .verify(&other, [("acme", &key)])
            .unwrap_err()
            .contains("changed after signing"));

        let (_, stranger) = keygen();
        let stranger = parse_public(&stranger).unwrap();
        assert!(sig
            .verify(&digest, [("stranger", &stranger)])
            .unwrap_err()
            .contains("a key no admin trusts"));

        // A signature by another key, presented as acme's.
        let (other_secret, _) = keygen();
        let forged = sign(&other_secret, &digest).unwrap();
        let parts: Vec<&str> = forged.split_whitespace().collect();
        let relabelled = format!(
            "{} {} {} {}",
            parts[0],
            hex::encode(key),
            parts[2],
            parts[3]
        );
        let forged = PluginSignature::parse(&relabelled).unwrap();
        assert!(forged
            .verify(&digest, [("acme", &key)])
            .unwrap_err()
            .contains("signed by another key"));
    }

    #[test]
    fn malformed_files_are_named() {
        assert!(parse_public("ssh-ed25519 AAAA")
            .unwrap_err()
            .to_string()
            .contains("not a Kiln public key"));
        assert!(sign("kiln-ed25519-secret zz", "sha256:00")
            .unwrap_err()
            .to_string()
            .contains("64 hex digits"));
        assert!(PluginSignature::parse("kiln-ed25519-signature a b")
            .unwrap_err()
            .to_string()
            .contains("a public key, a digest and a signature"));
    }
}
