//! The DER forms a signing service answers in, turned into JOSE's: an
//! ECDSA-Sig-Value (RFC 3279) into ES256's r ‖ s (RFC 7518 §3.4), and a
//! P-256 SubjectPublicKeyInfo (RFC 5480) into its uncompressed point.

use der::asn1::UintRef;
use der::{Decode, Reader, SliceReader};
use spki::{ObjectIdentifier, SubjectPublicKeyInfoRef};

/// id-ecPublicKey.
const EC_PUBLIC_KEY: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.2.1");
/// prime256v1 (P-256).
const P256: ObjectIdentifier = ObjectIdentifier::new_unwrap("1.2.840.10045.3.1.7");

/// r ‖ s, each left-padded to 32 bytes, from `SEQUENCE { r INTEGER, s
/// INTEGER }` in strict DER; `None` for anything else (trailing bytes, a
/// negative, zero or over-long integer).
pub fn fixed_from_der(der: &[u8]) -> Option<[u8; 64]> {
    let mut reader = SliceReader::new(der).ok()?;
    let (r, s) = reader
        .sequence(|seq| Ok((UintRef::decode(seq)?, UintRef::decode(seq)?)))
        .ok()?;
    reader.finish(()).ok()?;
    let mut fixed = [0u8; 64];
    for (half, int) in [(0, r), (32, s)] {
        let bytes = int.as_bytes();
        if bytes.len() > 32 || bytes.iter().all(|b| *b == 0) {
            return None;
        }
        fixed[half + 32 - bytes.len()..half + 32].copy_from_slice(bytes);
    }
    Some(fixed)
}

/// The uncompressed point (0x04 ‖ x ‖ y) of a P-256 public key in a DER
/// SubjectPublicKeyInfo; `None` for another curve or form.
pub fn p256_point_from_spki(der: &[u8]) -> Option<[u8; 65]> {
    let spki = SubjectPublicKeyInfoRef::from_der(der).ok()?;
    if spki.algorithm.oid != EC_PUBLIC_KEY || spki.algorithm.parameters_oid().ok()? != P256 {
        return None;
    }
    let point: [u8; 65] = spki.subject_public_key.as_bytes()?.try_into().ok()?;
    (point[0] == 0x04).then_some(point)
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::signature::{UnparsedPublicKey, ECDSA_P256_SHA256_FIXED};

    /// RFC 6979 A.2.5: the P-256 key, and its SHA-256 signature over
    /// "sample" (both r and s have their top bit set, so DER pads them).
    const X: &str = "60fed4ba255a9d31c961eb74c6356d68c049b8923b61fa6ce669622e60f29fb6";
    const Y: &str = "7903fe1008b8bc99a41ae9e95628bc64f2f1b20c2d7e9f5177a3c294d4462299";
    const R: &str = "efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716";
    const S: &str = "f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8";

    fn der_integer(big_endian: &[u8]) -> Vec<u8> {
        let mut value = big_endian.to_vec();
        while value.len() > 1 && value[0] == 0 && value[1] < 0x80 {
            value.remove(0);
        }
        if value[0] >= 0x80 {
            value.insert(0, 0);
        }
        let mut out = vec![0x02, value.len() as u8];
        out.extend(value);
        out
    }

    fn der_signature(r: &[u8], s: &[u8]) -> Vec<u8> {
        let body = [der_integer(r), der_integer(s)].concat();
        let mut out = vec![0x30, body.len() as u8];
        out.extend(body);
        out
    }

    #[test]
    fn the_rfc_6979_signature_converts_and_verifies_as_es256() {
        let (r, s) = (hex::decode(R).unwrap(), hex::decode(S).unwrap());
        let der = der_signature(&r, &s);
        assert_eq!(der[..5], [0x30, 0x46, 0x02, 0x21, 0x00], "padded r");
        let fixed = fixed_from_der(&der).unwrap();
        assert_eq!(fixed[..32], r[..]);
        assert_eq!(fixed[32..], s[..]);
        let point = hex::decode(format!("04{X}{Y}")).unwrap();
        UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point)
            .verify(b"sample", &fixed)
            .expect("the converted signature verifies");
    }

    #[test]
    fn short_integers_are_left_padded() {
        let mut r = [0u8; 32];
        r[31] = 7;
        let mut s = [0u8; 32];
        s[1..].fill(0x11);
        let der = der_signature(&r, &s);
        assert_eq!(der[..5], [0x30, 0x24, 0x02, 0x01, 0x07], "r is one byte");
        let fixed = fixed_from_der(&der).unwrap();
        assert_eq!(fixed[..32], r);
        assert_eq!(fixed[32..], s);
    }

    #[test]
    fn anything_but_strict_der_of_two_positive_32_byte_integers_is_refused() {
        let (r, s) = (hex::decode(R).unwrap(), hex::decode(S).unwrap());
        let good = der_signature(&r, &s);
        let mut trailing = good.clone();
        trailing.push(0);
        assert_eq!(fixed_from_der(&trailing), None, "trailing bytes");
        assert_eq!(fixed_from_der(&good[..good.len() - 1]), None, "cut short");
        let long = der_signature(&[[1u8].as_slice(), &r].concat(), &s);
        assert_eq!(fixed_from_der(&long), None, "33 significant bytes");
        assert_eq!(fixed_from_der(&der_signature(&[0], &s)), None, "zero r");
        // r without its pad byte reads as negative.
        let mut negative = good.clone();
        negative.remove(4);
        negative[1] -= 1;
        negative[3] -= 1;
        assert_eq!(fixed_from_der(&negative), None, "negative r");
        // A needless leading zero is not DER.
        let padded = [
            &[0x30, 0x47, 0x02, 0x22, 0x00, 0x00][..],
            &r,
            &der_integer(&s),
        ]
        .concat();
        assert_eq!(fixed_from_der(&padded), None, "non-minimal r");
    }

    /// The SubjectPublicKeyInfo prefix of every P-256 key, as KMS and
    /// OpenSSL write it.
    const P256_SPKI_PREFIX: &str = "3059301306072a8648ce3d020106082a8648ce3d030107034200";

    #[test]
    fn a_p256_spki_gives_its_point_and_other_curves_are_refused() {
        let point = hex::decode(format!("04{X}{Y}")).unwrap();
        let spki = hex::decode(format!("{P256_SPKI_PREFIX}04{X}{Y}")).unwrap();
        assert_eq!(p256_point_from_spki(&spki).unwrap()[..], point[..]);
        // secp256k1's OID (1.3.132.0.10) in place of prime256v1's.
        let k1 = hex::decode(format!(
            "3056301006072a8648ce3d020106052b8104000a03420004{X}{Y}"
        ))
        .unwrap();
        assert_eq!(p256_point_from_spki(&k1), None);
        let mut compressed = spki.clone();
        compressed[26] = 0x02;
        assert_eq!(p256_point_from_spki(&compressed), None);
        assert_eq!(p256_point_from_spki(&spki[..spki.len() - 1]), None);
    }
}
