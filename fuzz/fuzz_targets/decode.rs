//! Feeds arbitrary bytes to the packet decoder the way a socket would: in chunks of arbitrary
//! size, first as a connection awaiting CONNECT, then as an established 3.1.1 and 5.0 connection.
//! The decoder must never panic, never loop, and never consume bytes it reports as incomplete.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use telemq::protocol::{decode, ProtocolVersion};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, data)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk.max(1));
    for version in [None, Some(ProtocolVersion::V3_1_1), Some(ProtocolVersion::V5)] {
        let mut buf = BytesMut::new();
        'feed: for piece in data.chunks(chunk) {
            buf.extend_from_slice(piece);
            loop {
                let before = buf.len();
                match decode(&mut buf, version, 64 * 1024) {
                    Ok(Some(_)) => assert!(buf.len() < before),
                    Ok(None) => {
                        assert_eq!(buf.len(), before);
                        break;
                    }
                    Err(_) => break 'feed,
                }
            }
        }
    }
});
