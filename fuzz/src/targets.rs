//! What each fuzz target checks. Plain functions of the fuzzer's bytes: a
//! panic is a finding.

use std::time::Duration;

use arbitrary::{Arbitrary, Unstructured};
use eserver::apps::pubsub::{Command, MAX_TOPIC, parse};
use eserver::framing::{ByteOrder, Codec, Decoded, FrameError, LengthPrefixed, Lines, decode_all};
use eserver::scenario::{DEFAULT_LINGER_MS, DialTarget, Op, Scenario, run};
use eserver::server::config::DEFAULT_FRAME_BUDGET;
use eserver::sys::fault::FaultConfig;
use eserver::{IdleWait, WriteInterest};

/// Splits fuzzer bytes into (parameters, cut points, stream): the first
/// byte says how many cut points (two bytes each) follow.
fn cuts_and_stream(data: &[u8]) -> (Vec<usize>, &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return (Vec::new(), &[]);
    };
    let n = usize::from(n % 8);
    let (cuts, stream) = rest.split_at((2 * n).min(rest.len()));
    let cuts = cuts
        .chunks(2)
        .map(|c| usize::from(c[0]) << 8 | usize::from(*c.get(1).unwrap_or(&0)))
        .collect();
    (cuts, stream)
}

/// Decodes `stream` fed in pieces ending at `cuts`, as the server's reader
/// does: appending each piece to a buffer, decoding all it can with
/// [`Codec::decode_from`], told how much of the buffer an earlier call found
/// incomplete (the hint a scanning codec starts from). Checks that the
/// hinted result is exactly `decode`'s, and that no `need` asks for more
/// than `max` bytes (the whole frame, header or terminator included).
fn decode_split<C: Codec>(
    codec: &C,
    stream: &[u8],
    cuts: &[usize],
    max: usize,
) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut points: Vec<usize> = cuts.iter().map(|c| c % (stream.len() + 1)).collect();
    points.push(stream.len());
    points.sort_unstable();
    let mut buf = Vec::new();
    let mut frames = Vec::new();
    let mut fed = 0;
    // Bytes at the front of `buf` already found to hold no whole frame.
    let mut seen = 0;
    for point in points {
        buf.extend_from_slice(&stream[fed..point]);
        fed = point;
        loop {
            let hinted = codec.decode_from(&buf, seen);
            assert_eq!(hinted, codec.decode(&buf), "the hint changed the result");
            match hinted {
                Ok(Decoded::Frame { payload, consumed }) => {
                    assert!(consumed <= buf.len(), "consumed past the input");
                    assert!(consumed > 0, "a frame of no bytes");
                    frames.push(buf[payload].to_vec());
                    buf.drain(..consumed);
                    seen = 0;
                }
                Ok(Decoded::Incomplete { need }) => {
                    if let Some(need) = need {
                        assert!(
                            need <= max,
                            "asks to buffer {need} bytes for a frame limited to {max}"
                        );
                        assert!(need > buf.len(), "asks for no more than it has");
                    }
                    seen = buf.len();
                    break;
                }
                Err(e) => return (frames, Some(e)),
            }
        }
    }
    (frames, None)
}

/// The length-prefixed format as the spec says it, written the obvious way.
fn model_len(
    order: ByteOrder,
    max: usize,
    mut stream: &[u8],
) -> (Vec<Vec<u8>>, Option<FrameError>) {
    let mut frames = Vec::new();
    while stream.len() >= 4 {
        let header = [stream[0], stream[1], stream[2], stream[3]];
        let len = match order {
            ByteOrder::Little => u32::from_le_bytes(header),
            ByteOrder::Big => u32::from_be_bytes(header),
        } as usize;
        if len > max {
            return (
                frames,
                Some(FrameError::TooLarge {
                    len: len as u64,
                    max,
                }),
            );
        }
        if stream.len() < 4 + len {
            break;
        }
        frames.push(stream[4..4 + len].to_vec());
        stream = &stream[4 + len..];
    }
    (frames, None)
}

/// `frame_len`: arbitrary bytes through the length-prefixed decoder, both
/// byte orders. No panic; `consumed` never past the input; no frame or
/// buffer request beyond `max_frame`; the same frames and error whole, split
/// anywhere, and as the reference model says.
pub fn frame_len(data: &[u8]) {
    let Some((&params, data)) = data.split_first() else {
        return;
    };
    let order = if params & 1 == 0 {
        ByteOrder::Little
    } else {
        ByteOrder::Big
    };
    // Small limits, so frames at and around the limit are common.
    let max = usize::from(params >> 1) * 4;
    let codec = LengthPrefixed::new(order, max);
    let (cuts, stream) = cuts_and_stream(data);
    let (whole, used, whole_err) = decode_all(&codec, stream);
    assert!(used <= stream.len());
    for f in &whole {
        assert!(
            f.len() <= max,
            "a {}-byte frame passed a {max}-byte limit",
            f.len()
        );
    }
    assert_eq!(
        (whole.clone(), whole_err),
        model_len(order, max, stream),
        "decoder and model disagree"
    );
    let (split, split_err) = decode_split(&codec, stream, &cuts, max + 4);
    assert_eq!(split, whole, "split decoding gave other frames");
    assert_eq!(split_err, whole_err, "split decoding gave another error");
}

/// `frame_lines`: the same for the line decoder.
pub fn frame_lines(data: &[u8]) {
    let Some((&params, data)) = data.split_first() else {
        return;
    };
    let max = usize::from(params);
    let codec = Lines::new(max);
    let (cuts, stream) = cuts_and_stream(data);
    let (whole, used, whole_err) = decode_all(&codec, stream);
    assert!(used <= stream.len());
    for f in &whole {
        assert!(
            f.len() <= max,
            "a {}-byte line passed a {max}-byte limit",
            f.len()
        );
        assert!(!f.contains(&b'\n'), "a line with a newline in it");
    }
    // The model: lines end at '\n'; a '\r' before it is dropped.
    let mut model = Vec::new();
    let mut model_err = None;
    let mut rest = stream;
    loop {
        match rest.iter().position(|&b| b == b'\n') {
            Some(nl) if nl <= max + 1 => {
                let end = if nl > 0 && rest[nl - 1] == b'\r' {
                    nl - 1
                } else {
                    nl
                };
                if end > max {
                    model_err = Some(FrameError::LineTooLong { max });
                    break;
                }
                model.push(rest[..end].to_vec());
                rest = &rest[nl + 1..];
            }
            Some(_) => {
                model_err = Some(FrameError::LineTooLong { max });
                break;
            }
            None if rest.len() >= max + 2 => {
                model_err = Some(FrameError::LineTooLong { max });
                break;
            }
            None => break,
        }
    }
    assert_eq!(
        (whole.clone(), whole_err),
        (model, model_err),
        "decoder and model disagree"
    );
    let (split, split_err) = decode_split(&codec, stream, &cuts, max + 2);
    assert_eq!(split, whole, "split decoding gave other lines");
    assert_eq!(split_err, whole_err, "split decoding gave another error");
}

/// `codec_roundtrip`: arbitrary payloads, encoded then decoded, come back
/// equal with every codec that accepts them; and every payload the input
/// itself decodes to (what a peer could send) encodes back.
pub fn codec_roundtrip(data: &[u8]) {
    let mut u = Unstructured::new(data);
    let Ok(payloads) = Vec::<Vec<u8>>::arbitrary(&mut u) else {
        return;
    };
    let max = u.int_in_range(0..=4096usize).unwrap_or(4096);
    // Each codec with what it must take: every payload up to `max` (lines:
    // without a newline), and nothing else. (Without this, a codec that
    // refused everything passed.)
    let fits_length = |p: &[u8]| p.len() <= max;
    let fits_line = |p: &[u8]| p.len() <= max && !p.contains(&b'\n');
    type Fits<'a> = &'a dyn Fn(&[u8]) -> bool;
    let codecs: [(Box<dyn Codec>, Fits<'_>); 3] = [
        (
            Box::new(LengthPrefixed::new(ByteOrder::Little, max)),
            &fits_length,
        ),
        (
            Box::new(LengthPrefixed::new(ByteOrder::Big, max)),
            &fits_length,
        ),
        (Box::new(Lines::new(max)), &fits_line),
    ];
    for (codec, fits) in &codecs {
        let mut wire = Vec::new();
        let mut sent = Vec::new();
        for p in &payloads {
            let before = wire.len();
            let encoded = codec.encode(&[p], &mut wire);
            assert_eq!(
                encoded.is_ok(),
                fits(p),
                "a {}-byte payload (max {max}): {encoded:?}",
                p.len()
            );
            match encoded {
                Ok(()) => sent.push(p.clone()),
                Err(_) => assert_eq!(wire.len(), before, "a refused encode wrote something"),
            }
        }
        let (got, used, err) = decode_all(codec.as_ref(), &wire);
        assert_eq!(err, None, "decoding what was encoded failed");
        assert_eq!(used, wire.len());
        assert_eq!(got, sent);
        let (received, _, _) = decode_all(codec.as_ref(), data);
        for payload in received {
            let mut back = Vec::new();
            assert_eq!(
                codec.encode(&[&payload], &mut back),
                Ok(()),
                "a decoded payload could not be sent back"
            );
            assert_eq!(decode_all(codec.as_ref(), &back).0, vec![payload]);
        }
    }
}

/// A scenario decoded from fuzzer bytes, kept small enough to run fast.
#[derive(Debug)]
pub struct FuzzScenario(pub Scenario);

#[derive(Arbitrary, Debug)]
enum FuzzOp {
    Connect,
    Write(u8, u16),
    Read(u8, u16),
    Garbage(u8),
    Shutdown(u8),
    Close(u8),
    Reset(u8),
    ServerClose(u8, bool),
    HandleSend(u8, u8),
    StaleSend(u8),
    Yield(u8),
    Sleep(u8),
}

impl<'a> Arbitrary<'a> for FuzzScenario {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let seed = u64::arbitrary(u)?;
        let mut s = Scenario::new(seed);
        s.workers = u.int_in_range(1..=4)?;
        s.buffer = *u.choose(&[7, 64, 256, 4096])?;
        s.max_out = *u.choose(&[16, 200, 1024, 65536])?;
        s.max_conns = u.int_in_range(1..=6)?;
        s.read_budget = *u.choose(&[1, 16, 512, 65536])?;
        s.events_per_wait = *u.choose(&[1, 2, 8, 64])?;
        s.frames = u.int_in_range(0..=16)?;
        s.max_payload = *u.choose(&[0, 16, 200, 3000])?;
        s.faults = match u.int_in_range(0..=2)? {
            0 => FaultConfig::none(seed),
            1 => FaultConfig::benign(seed),
            _ => FaultConfig::hostile(seed),
        };
        s.idle_timeout_ms = *u.choose(&[0, 0, 5, 50, 500])?;
        s.frame_timeout_ms = *u.choose(&[0, 0, 5, 50, 500])?;
        let clients = u.int_in_range(1..=4)?;
        s.ops = std::iter::repeat_n(Op::Connect, clients).collect();
        for _ in 0..u.int_in_range(0..=48)? {
            s.ops.push(match FuzzOp::arbitrary(u)? {
                FuzzOp::Connect => Op::Connect,
                FuzzOp::Write(client, len) => Op::Write {
                    client,
                    len: len % 2048 + 1,
                },
                FuzzOp::Read(client, max) => Op::Read {
                    client,
                    max: max % 4096 + 1,
                },
                FuzzOp::Garbage(client) => Op::Garbage { client },
                FuzzOp::Shutdown(client) => Op::Shutdown { client },
                FuzzOp::Close(client) => Op::Close { client },
                FuzzOp::Reset(client) => Op::Reset { client },
                FuzzOp::ServerClose(client, after_flush) => Op::ServerClose {
                    client,
                    after_flush,
                },
                FuzzOp::HandleSend(client, len) => Op::HandleSend {
                    client,
                    len: u16::from(len) * 2,
                },
                FuzzOp::StaleSend(len) => Op::StaleSend {
                    len: u16::from(len),
                },
                FuzzOp::Yield(steps) => Op::Yield {
                    steps: steps % 32 + 1,
                },
                FuzzOp::Sleep(ms) => Op::Sleep {
                    millis: u16::from(ms) + 1,
                },
            });
        }
        // Drawn last, so that inputs found before these were drawn decode to
        // the scenarios they were found with (bytes that run out draw the
        // first choice: the default budget, every worker polling). The
        // thresholds are those of `tests/sim.rs`: 0 never counts a wait as
        // busy, 25 µs sorts waits by whether they blocked, 1 s counts every
        // wait that brings events.
        s.frame_budget = *u.choose(&[DEFAULT_FRAME_BUDGET, 1, 2, 3])?;
        s.idle_wait = match u.int_in_range(0..=3)? {
            0 => IdleWait::Poll,
            1 => standby(Duration::ZERO),
            2 => standby(Duration::from_micros(25)),
            _ => standby(Duration::from_secs(1)),
        };
        // Parking steps, inserted among the others; drawn last for the same
        // reason (bytes that run out insert none).
        for _ in 0..u.int_in_range(0..=3)? {
            let at = u.int_in_range(0..=s.ops.len())?;
            let op = if bool::arbitrary(u)? {
                Op::ParkAll {
                    steps: u8::arbitrary(u)? % 20,
                }
            } else {
                Op::SetActiveWorkers {
                    n: u8::arbitrary(u)?,
                }
            };
            s.ops.insert(at, op);
        }
        if s.faults != FaultConfig::none(seed) {
            s.faults.futex_early = *u.choose(&[0.0, 0.3])?;
        }
        // Outbound connections, and preemption after calls: drawn last for
        // the same reason (bytes that run out insert none, and preempt
        // nowhere).
        for _ in 0..u.int_in_range(0..=4)? {
            let at = u.int_in_range(0..=s.ops.len())?;
            let op = match u.int_in_range(0..=7)? {
                0..=2 => Op::Dial {
                    target: DialTarget::Listening,
                },
                3 => Op::Dial {
                    target: DialTarget::Closed,
                },
                4 => Op::Dial {
                    target: DialTarget::Unreachable,
                },
                5 => Op::Answer { refuse: true },
                _ => Op::Answer { refuse: false },
            };
            s.ops.insert(at, op);
        }
        s.faults.preempt = *u.choose(&[0.0, 0.2])?;
        // Drawn last, for the same reason.
        s.write_interest = *u.choose(&[WriteInterest::AfterEagain, WriteInterest::Registered])?;
        s.dials_speak_first = bool::arbitrary(u)?;
        // Lingering closes (a review found the fuzzer never made any): drawn
        // last, for the same reason.
        s.linger_ms = *u.choose(&[0, 5, 50, DEFAULT_LINGER_MS])?;
        // The finer schedule (points before each read or write's lookup,
        // and inside handler calls): drawn last, for the same reason.
        s.finer_schedule = bool::arbitrary(u)?;
        Ok(FuzzScenario(s))
    }
}

fn standby(busy_below: Duration) -> IdleWait {
    IdleWait::Standby { busy_below }
}

/// `sim_server`: a scenario decoded from the bytes, run on the simulated
/// kernel and checked like the proptest suite does.
pub fn sim_server(data: &[u8]) {
    let Ok(FuzzScenario(scenario)) = FuzzScenario::arbitrary(&mut Unstructured::new(data)) else {
        return;
    };
    if let Err(failure) = run(&scenario) {
        panic!("{failure}\n{scenario:?}");
    }
}

/// `pubsub_command`: arbitrary bytes through the pub/sub command parser: no
/// panic; what parses names a valid topic and re-encodes to the same bytes.
pub fn pubsub_command(data: &[u8]) {
    let Ok(command) = parse(data) else {
        return;
    };
    let (verb, topic, payload): (&[u8], &[u8], Option<&[u8]>) = match command {
        Command::Sub(topic) => (b"SUB", topic, None),
        Command::Unsub(topic) => (b"UNSUB", topic, None),
        Command::Pub(topic, payload) => (b"PUB", topic, Some(payload)),
    };
    assert!(
        !topic.is_empty() && topic.len() <= MAX_TOPIC,
        "invalid topic accepted"
    );
    assert!(!topic.contains(&b' '), "a topic with a space");
    let mut encoded = [verb, b" ", topic].concat();
    if let Some(payload) = payload {
        encoded.push(b' ');
        encoded.extend_from_slice(payload);
    }
    assert_eq!(
        encoded, data,
        "parsed command does not re-encode to its input"
    );
}
