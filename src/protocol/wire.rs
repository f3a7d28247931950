//! Primitive MQTT data representations (spec §1.5): integers, variable byte integers, UTF-8
//! strings and binary data, read from a frame that is already complete and written to a buffer.
//!
//! Readers never panic on short input: running past the end of a frame is a malformed packet.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use super::reason::ProtocolError;

const TRUNCATED: ProtocolError =
    ProtocolError::malformed("[MQTT-1.5] field runs past the end of the packet");

pub fn read_u8(buf: &mut Bytes) -> Result<u8, ProtocolError> {
    if buf.is_empty() {
        return Err(TRUNCATED);
    }
    Ok(buf.get_u8())
}

pub fn read_u16(buf: &mut Bytes) -> Result<u16, ProtocolError> {
    if buf.len() < 2 {
        return Err(TRUNCATED);
    }
    Ok(buf.get_u16())
}

pub fn read_u32(buf: &mut Bytes) -> Result<u32, ProtocolError> {
    if buf.len() < 4 {
        return Err(TRUNCATED);
    }
    Ok(buf.get_u32())
}

/// Variable byte integer [MQTT-1.5.5-1]: at most four bytes.
pub fn read_varint(buf: &mut Bytes) -> Result<u32, ProtocolError> {
    let mut value: u32 = 0;
    for i in 0..4 {
        let byte = read_u8(buf)?;
        value |= u32::from(byte & 0x7F) << (7 * i);
        if byte & 0x80 == 0 {
            return Ok(value);
        }
    }
    Err(ProtocolError::malformed(
        "[MQTT-1.5.5-1] variable byte integer longer than four bytes",
    ))
}

pub fn read_binary(buf: &mut Bytes) -> Result<Bytes, ProtocolError> {
    let len = usize::from(read_u16(buf)?);
    if buf.len() < len {
        return Err(TRUNCATED);
    }
    Ok(buf.split_to(len))
}

/// UTF-8 encoded string: well-formed UTF-8 [MQTT-1.5.4-1] without U+0000 [MQTT-1.5.4-2].
pub fn read_string(buf: &mut Bytes) -> Result<String, ProtocolError> {
    let raw = read_binary(buf)?;
    string_from_bytes(&raw)
}

pub fn string_from_bytes(raw: &[u8]) -> Result<String, ProtocolError> {
    let text = std::str::from_utf8(raw)
        .map_err(|_| ProtocolError::malformed("[MQTT-1.5.4-1] string is not well-formed UTF-8"))?;
    check_no_nul(text)?;
    Ok(text.to_owned())
}

pub fn check_no_nul(text: &str) -> Result<(), ProtocolError> {
    if text.contains('\0') {
        return Err(ProtocolError::malformed(
            "[MQTT-1.5.4-2] string contains the null character U+0000",
        ));
    }
    Ok(())
}

/// Number of bytes a variable byte integer takes on the wire.
pub fn varint_len(value: usize) -> usize {
    match value {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

pub fn write_varint(buf: &mut BytesMut, mut value: usize) {
    loop {
        let mut byte = (value % 128) as u8;
        value /= 128;
        if value > 0 {
            byte |= 0x80;
        }
        buf.put_u8(byte);
        if value == 0 {
            break;
        }
    }
}

pub fn write_binary(buf: &mut BytesMut, data: &[u8]) {
    // Callers bound every field by the 65,535-byte limit before encoding (strings come from
    // decoded packets or configuration validated at start-up).
    buf.put_u16(data.len() as u16);
    buf.put_slice(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_round_trips_at_every_width_boundary() {
        for value in [
            0usize,
            127,
            128,
            16_383,
            16_384,
            2_097_151,
            2_097_152,
            268_435_455,
        ] {
            let mut out = BytesMut::new();
            write_varint(&mut out, value);
            assert_eq!(out.len(), varint_len(value), "width of {value}");
            let mut input = out.freeze();
            assert_eq!(read_varint(&mut input).unwrap() as usize, value);
            assert!(input.is_empty());
        }
    }

    #[test]
    fn five_byte_varint_is_malformed() {
        let mut input = Bytes::from_static(&[0xFF, 0xFF, 0xFF, 0xFF, 0x01]);
        assert!(read_varint(&mut input).is_err());
    }

    #[test]
    fn strings_reject_invalid_utf8_and_nul() {
        let mut bad_utf8 = Bytes::from_static(&[0x00, 0x02, 0xC3, 0x28]);
        assert!(read_string(&mut bad_utf8).is_err());
        let mut nul = Bytes::from_static(&[0x00, 0x03, b'a', 0x00, b'b']);
        assert!(read_string(&mut nul).is_err());
        let mut ok = Bytes::from_static(&[0x00, 0x02, b'h', b'i']);
        assert_eq!(read_string(&mut ok).unwrap(), "hi");
    }

    #[test]
    fn truncated_fields_are_errors_not_panics() {
        assert!(read_u16(&mut Bytes::from_static(&[1])).is_err());
        assert!(read_u32(&mut Bytes::from_static(&[1, 2, 3])).is_err());
        assert!(read_binary(&mut Bytes::from_static(&[0, 5, 1])).is_err());
    }
}
