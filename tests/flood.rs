//! A flood into a subscriber that never reads its socket. Alone in its test binary, so that
//! the process's RSS is this test's alone.

mod common;

use std::time::Duration;

use common::packets;
use common::rumqtt::v5::{QoS, V5Client};
use common::{raw_v5, TestBroker, WAIT};
use telemq::config::OverflowPolicy;

fn vm_rss_kib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

#[tokio::test]
async fn a_subscriber_that_never_reads_neither_grows_memory_nor_slows_a_fast_one() {
    const MESSAGES: usize = 1500;
    const PAYLOAD: usize = 32 * 1024;
    const MAX_BYTES: usize = 1024 * 1024;
    let broker = TestBroker::start_with(|config| {
        config.queue.max_bytes = MAX_BYTES;
        config.queue.policy = OverflowPolicy::DropOldest;
    })
    .await;
    let mut stuck = raw_v5(broker.addr, "stuck").await;
    stuck
        .send(&packets::subscribe(1, "flood", 1, Some(&[])))
        .await;
    stuck.recv_type(9).await;
    let (mut fast, _) = V5Client::connect_large(broker.addr, "fast", false).await;
    fast.subscribe("flood", QoS::AtLeastOnce).await;
    let (mut publisher, _) = V5Client::connect(broker.addr, "firehose").await;
    let rss_before = vm_rss_kib();
    let fast_reader = tokio::spawn(async move {
        let mut received = 0;
        while received < MESSAGES {
            let publish = fast.next_publish().await;
            assert_eq!(publish.payload.len(), PAYLOAD);
            received += 1;
        }
        fast
    });
    let payload = vec![7u8; PAYLOAD];
    let mut peak_queued = 0;
    for _ in 0..MESSAGES {
        publisher
            .publish("flood", QoS::AtLeastOnce, false, payload.clone())
            .await;
        peak_queued = peak_queued.max(broker.broker().queued_bytes());
    }
    let mut fast = tokio::time::timeout(WAIT * 4, fast_reader)
        .await
        .expect("the fast subscriber got every message")
        .unwrap();
    fast.expect_no_publish_for(Duration::from_millis(50)).await;
    // 47 MiB went through; the stuck subscriber holds at most its queue bound.
    let grown_mib = vm_rss_kib().saturating_sub(rss_before) / 1024;
    assert!(peak_queued <= 2 * MAX_BYTES, "queued {peak_queued} bytes");
    assert!(grown_mib < 32, "RSS grew by {grown_mib} MiB");
    broker.shutdown().await;
}
