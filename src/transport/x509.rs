//! Just enough DER to read a client certificate's subject common name and subject alternative
//! names (RFC 5280 §4.1, §4.2.1.6), which rustls verifies but does not expose.

/// One TLV: its tag and contents, and what follows it.
fn next(input: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, rest) = input.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (length, rest) = if first < 0x80 {
        (usize::from(first), rest)
    } else {
        let count = usize::from(first & 0x7f);
        if count == 0 || count > 4 || rest.len() < count {
            return None;
        }
        let length = rest[..count]
            .iter()
            .fold(0usize, |acc, &byte| (acc << 8) | usize::from(byte));
        (length, &rest[count..])
    };
    if rest.len() < length {
        return None;
    }
    Some((tag, &rest[..length], &rest[length..]))
}

const SEQUENCE: u8 = 0x30;
const SET: u8 = 0x31;
const OID: u8 = 0x06;
const OID_COMMON_NAME: &[u8] = &[0x55, 0x04, 0x03];
const OID_SUBJECT_ALT_NAME: &[u8] = &[0x55, 0x1d, 0x11];

/// The TBSCertificate's fields.
fn tbs_fields(cert: &[u8]) -> Option<Vec<(u8, &[u8])>> {
    let (SEQUENCE, certificate, _) = next(cert)? else {
        return None;
    };
    let (SEQUENCE, mut tbs, _) = next(certificate)? else {
        return None;
    };
    let mut fields = Vec::new();
    while !tbs.is_empty() {
        let (tag, value, rest) = next(tbs)?;
        fields.push((tag, value));
        tbs = rest;
    }
    Some(fields)
}

/// The subject's (last) common name.
pub fn common_name(cert: &[u8]) -> Option<String> {
    let fields = tbs_fields(cert)?;
    // Fields: [0] version (optional), serial, signature, issuer, validity, subject, ...
    let skip = usize::from(fields.first()?.0 == 0xa0);
    let (SEQUENCE, mut subject) = *fields.get(skip + 4)? else {
        return None;
    };
    let mut found = None;
    while !subject.is_empty() {
        let (SET, mut set, rest) = next(subject)? else {
            return None;
        };
        subject = rest;
        while !set.is_empty() {
            let (SEQUENCE, attribute, after) = next(set)? else {
                return None;
            };
            set = after;
            let (OID, oid, value) = next(attribute)? else {
                return None;
            };
            if oid == OID_COMMON_NAME {
                let (_string_tag, text, _) = next(value)?;
                found = Some(String::from_utf8(text.to_vec()).ok()?);
            }
        }
    }
    found
}

/// The first DNS name, e-mail address or URI among the subject alternative names.
pub fn first_alt_name(cert: &[u8]) -> Option<String> {
    let fields = tbs_fields(cert)?;
    let (_, extensions) = fields.iter().find(|(tag, _)| *tag == 0xa3)?;
    let (SEQUENCE, mut extensions, _) = next(extensions)? else {
        return None;
    };
    while !extensions.is_empty() {
        let (SEQUENCE, extension, rest) = next(extensions)? else {
            return None;
        };
        extensions = rest;
        let (OID, oid, mut value) = next(extension)? else {
            return None;
        };
        if oid != OID_SUBJECT_ALT_NAME {
            continue;
        }
        // An optional `critical` BOOLEAN, then the OCTET STRING wrapping GeneralNames.
        let (mut tag, mut octets, rest) = next(value)?;
        if tag == 0x01 {
            value = rest;
            (tag, octets, _) = next(value)?;
        }
        if tag != 0x04 {
            return None;
        }
        let (SEQUENCE, mut names, _) = next(octets)? else {
            return None;
        };
        while !names.is_empty() {
            let (tag, name, rest) = next(names)?;
            names = rest;
            // [1] rfc822Name, [2] dNSName, [6] uniformResourceIdentifier: IA5String contents.
            if matches!(tag, 0x81 | 0x82 | 0x86) {
                return String::from_utf8(name.to_vec()).ok();
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(common_name: &str, alt_names: Vec<String>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::new(alt_names).unwrap();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "telemq tests");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, common_name);
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn reads_common_name_and_alt_names_from_real_certificates() {
        let der = cert("sensor-17", vec!["sensor-17.example.com".into()]);
        assert_eq!(common_name(&der).as_deref(), Some("sensor-17"));
        assert_eq!(
            first_alt_name(&der).as_deref(),
            Some("sensor-17.example.com")
        );
        let no_san = cert("only-cn", vec![]);
        assert_eq!(common_name(&no_san).as_deref(), Some("only-cn"));
        assert_eq!(first_alt_name(&no_san), None);
    }

    #[test]
    fn garbage_and_truncation_yield_nothing() {
        let der = cert("sensor", vec!["a.example".into()]);
        for cut in [0, 1, 5, der.len() / 2] {
            assert_eq!(common_name(&der[..cut]), None);
            assert_eq!(first_alt_name(&der[..cut]), None);
        }
        assert_eq!(common_name(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }
}
