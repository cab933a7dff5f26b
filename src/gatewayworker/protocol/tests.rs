use super::*;
use crate::gatewayworker::php_cli;
use proptest::prelude::*;

fn sample() -> Packet {
    Packet {
        cmd: cmd::SEND_TO_GROUP,
        local_ip: 0x7f00_0001,
        local_port: 2900,
        client_ip: 0x0a00_0007,
        client_port: 51234,
        connection_id: 0xdead_beef,
        flag: flag::BODY_IS_SCALAR | flag::NOT_CALL_ENCODE,
        gateway_port: 8282,
        ext_data: Bytes::from_static(br#"{"group":["g1"],"exclude":null}"#),
        body: Bytes::from_static(b"hello \xff"),
    }
}

#[test]
fn header_layout_is_gatewayworkers() {
    let packet = sample();
    let bytes = encode(&packet);
    let len = HEADER_LEN + packet.ext_data.len() + packet.body.len();
    assert_eq!(bytes.len(), len);
    assert_eq!(&bytes[0..4], &(len as u32).to_be_bytes());
    assert_eq!(bytes[4], 22);
    assert_eq!(&bytes[5..9], &[127, 0, 0, 1]);
    assert_eq!(&bytes[9..11], &2900u16.to_be_bytes());
    assert_eq!(&bytes[11..15], &[10, 0, 0, 7]);
    assert_eq!(&bytes[15..17], &51234u16.to_be_bytes());
    assert_eq!(&bytes[17..21], &[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(bytes[21], 0x03);
    assert_eq!(&bytes[22..24], &8282u16.to_be_bytes());
    assert_eq!(
        &bytes[24..28],
        &(packet.ext_data.len() as u32).to_be_bytes()
    );
    assert_eq!(&bytes[28..28 + packet.ext_data.len()], &packet.ext_data[..]);
    assert_eq!(&bytes[28 + packet.ext_data.len()..], &packet.body[..]);
    assert!(packet.body_is_scalar() && packet.is_raw());
}

#[test]
fn decodes_what_it_encodes_and_leaves_the_rest() {
    let (a, b) = (sample(), Packet::new(cmd::PING));
    let mut buf = BytesMut::new();
    buf.extend_from_slice(&encode(&a));
    buf.extend_from_slice(&encode(&b));
    buf.extend_from_slice(&[0, 0]);
    assert_eq!(decode(&mut buf, DEFAULT_MAX_PACKET).unwrap(), Some(a));
    assert_eq!(decode(&mut buf, DEFAULT_MAX_PACKET).unwrap(), Some(b));
    assert_eq!(decode(&mut buf, DEFAULT_MAX_PACKET).unwrap(), None);
    assert_eq!(&buf[..], &[0, 0]);
}

#[test]
fn waits_for_every_byte_of_a_packet() {
    let bytes = encode(&sample());
    let mut buf = BytesMut::new();
    for (i, byte) in bytes.iter().enumerate() {
        buf.extend_from_slice(&[*byte]);
        let decoded = decode(&mut buf, DEFAULT_MAX_PACKET).unwrap();
        if i + 1 < bytes.len() {
            assert_eq!(decoded, None, "after {} bytes", i + 1);
        } else {
            assert_eq!(decoded, Some(sample()));
        }
    }
    assert!(buf.is_empty());
}

fn header(len: u32, ext_len: u32) -> BytesMut {
    let mut buf = BytesMut::new();
    buf.put_u32(len);
    buf.put_bytes(0, 20);
    buf.put_u32(ext_len);
    buf
}

#[test]
fn a_length_below_the_header_is_refused_at_once() {
    for len in [0u32, 1, 27] {
        let mut buf = BytesMut::from(&len.to_be_bytes()[..]);
        assert!(matches!(
            decode(&mut buf, DEFAULT_MAX_PACKET),
            Err(ProtocolError::ShorterThanHeader { len: l }) if l == len
        ));
    }
    // Exactly a header: an empty packet.
    let mut buf = header(28, 0);
    assert_eq!(
        decode(&mut buf, DEFAULT_MAX_PACKET).unwrap(),
        Some(Packet::default())
    );
}

#[test]
fn a_length_over_the_limit_is_refused_before_the_packet_arrives() {
    let mut buf = BytesMut::from(&u32::MAX.to_be_bytes()[..]);
    let err = decode(&mut buf, DEFAULT_MAX_PACKET).unwrap_err();
    assert!(
        matches!(err, ProtocolError::TooLong { len, max } if len == u64::from(u32::MAX) && max == DEFAULT_MAX_PACKET)
    );
    assert!(err.to_string().contains("over the 10485760-byte limit"));
    assert!(buf.capacity() < 64, "nothing reserved for it");

    let mut buf = BytesMut::from(&101u32.to_be_bytes()[..]);
    assert!(decode(&mut buf, 100).is_err());
    let mut buf = BytesMut::from(&100u32.to_be_bytes()[..]);
    assert_eq!(decode(&mut buf, 100).unwrap(), None);
}

#[test]
fn room_reserved_never_exceeds_the_packet_much() {
    let max = 4096;
    let mut buf = header(max as u32, 0);
    assert_eq!(decode(&mut buf, max).unwrap(), None);
    assert!(buf.capacity() >= max);
    assert!(buf.capacity() <= 2 * max, "capacity {}", buf.capacity());
}

#[test]
fn ext_data_past_the_packet_is_refused() {
    let mut buf = header(40, 13);
    assert!(matches!(
        decode(&mut buf, DEFAULT_MAX_PACKET),
        Err(ProtocolError::ExtPastPacket {
            ext_len: 13,
            len: 40
        })
    ));
    let mut buf = header(40, u32::MAX);
    assert!(decode(&mut buf, DEFAULT_MAX_PACKET).is_err());
    // ext_data may take the whole packet, leaving an empty body.
    let mut buf = header(40, 12);
    buf.put_bytes(b'x', 12);
    let packet = decode(&mut buf, DEFAULT_MAX_PACKET).unwrap().unwrap();
    assert_eq!(&packet.ext_data[..], b"xxxxxxxxxxxx");
    assert!(packet.body.is_empty());
}

#[test]
fn replies_are_length_then_serialized_value() {
    let reply = encode_reply(b"i:1;");
    assert_eq!(&reply[..], b"\x00\x00\x00\x04i:1;");
    let mut buf = BytesMut::from(&reply[..3]);
    assert_eq!(decode_reply(&mut buf, 100).unwrap(), None);
    buf.extend_from_slice(&reply[3..]);
    assert_eq!(
        decode_reply(&mut buf, 100).unwrap(),
        Some(Bytes::from_static(b"i:1;"))
    );
    let mut buf = BytesMut::from(&reply[..]);
    assert!(decode_reply(&mut buf, 3).is_err());
}

#[test]
fn the_codec_frames_packets_and_replies() {
    let mut codec = GatewayCodec::default();
    let mut buf = BytesMut::new();
    codec.encode(sample(), &mut buf).unwrap();
    codec
        .encode(Reply(Bytes::from_static(b"a:0:{}")), &mut buf)
        .unwrap();
    assert_eq!(codec.decode(&mut buf).unwrap(), Some(sample()));
    assert_eq!(&buf[..], b"\x00\x00\x00\x06a:0:{}");

    let mut small = GatewayCodec::new(30);
    let mut buf = BytesMut::from(&encode(&sample())[..]);
    assert!(small.decode(&mut buf).is_err());
}

#[test]
fn every_command_has_one_name() {
    assert_eq!(cmd::ALL.len(), 32);
    for (code, name) in cmd::ALL {
        assert_eq!(cmd::name(code), Some(name));
        assert_eq!(cmd::ALL.iter().filter(|(c, _)| *c == code).count(), 1);
    }
    assert_eq!(cmd::name(cmd::SELECT), Some("SELECT"));
    assert_eq!(cmd::name(2), None);
    assert_eq!(cmd::name(0), None);
}

fn arb_packet() -> impl Strategy<Value = Packet> {
    (
        (
            any::<u8>(),
            any::<u32>(),
            any::<u16>(),
            any::<u32>(),
            any::<u16>(),
        ),
        (any::<u32>(), any::<u8>(), any::<u16>()),
        proptest::collection::vec(any::<u8>(), 0..64),
        proptest::collection::vec(any::<u8>(), 0..256),
    )
        .prop_map(
            |(
                (cmd, local_ip, local_port, client_ip, client_port),
                (connection_id, flag, gateway_port),
                ext,
                body,
            )| Packet {
                cmd,
                local_ip,
                local_port,
                client_ip,
                client_port,
                connection_id,
                flag,
                gateway_port,
                ext_data: ext.into(),
                body: body.into(),
            },
        )
}

proptest! {
    #[test]
    fn encode_then_decode_is_the_same_packet(packet in arb_packet()) {
        let mut buf = BytesMut::from(&encode(&packet)[..]);
        prop_assert_eq!(decode(&mut buf, DEFAULT_MAX_PACKET).unwrap(), Some(packet));
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn packets_split_anywhere_arrive_whole(
        packets in proptest::collection::vec(arb_packet(), 1..4),
        cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
    ) {
        let stream: Vec<u8> = packets.iter().flat_map(|p| encode(p).to_vec()).collect();
        let mut cuts: Vec<usize> = cuts.iter().map(|c| c.index(stream.len() + 1)).collect();
        cuts.push(stream.len());
        cuts.sort_unstable();
        let (mut buf, mut got, mut from) = (BytesMut::new(), Vec::new(), 0);
        for cut in cuts {
            buf.extend_from_slice(&stream[from..cut]);
            from = cut;
            while let Some(packet) = decode(&mut buf, DEFAULT_MAX_PACKET).unwrap() {
                got.push(packet);
            }
        }
        prop_assert_eq!(got, packets);
        prop_assert!(buf.is_empty());
    }

    #[test]
    fn arbitrary_bytes_end_in_need_more_or_an_error(
        bytes in proptest::collection::vec(any::<u8>(), 0..512),
        max in 0usize..1024,
    ) {
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match decode(&mut buf, max) {
                Ok(Some(packet)) => {
                    prop_assert!(packet.encoded_len() <= max);
                    prop_assert_eq!(buf.len(), before - packet.encoded_len());
                }
                Ok(None) => {
                    prop_assert_eq!(buf.len(), before);
                    break;
                }
                Err(_) => break,
            }
        }
        let mut buf = BytesMut::from(&bytes[..]);
        while let Ok(Some(_)) = decode_reply(&mut buf, max) {}
    }

    #[test]
    fn mostly_valid_headers_never_panic(
        len in 0u32..200,
        ext_len in prop_oneof![0u32..200, Just(u32::MAX)],
        rest in proptest::collection::vec(any::<u8>(), 0..220),
        max in 0usize..256,
    ) {
        let mut buf = header(len, ext_len);
        buf.extend_from_slice(&rest);
        match decode(&mut buf, max) {
            Ok(Some(packet)) => {
                prop_assert_eq!(packet.encoded_len(), len as usize);
                prop_assert_eq!(packet.ext_data.len(), ext_len as usize);
            }
            Ok(None) => prop_assert!(buf.len() < len as usize),
            Err(_) => prop_assert!(
                (len as usize) < HEADER_LEN || len as usize > max || ext_len > len - 28
            ),
        }
    }
}

/// PHP's `pack("NCNnNnNCnN", …)` (the format GatewayProtocol uses) reads our
/// packets field for field, and we read what it packs.
#[test]
fn php_pack_and_unpack_agree() {
    let packet = sample();
    let stdin = format!(
        "{}\n",
        encode(&packet)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    );
    let Some(lines) = php_cli::lines(
        r#"$buf = hex2bin(trim(fgets(STDIN)));
        $d = unpack("Npack_len/Ccmd/Nlocal_ip/nlocal_port/Nclient_ip/nclient_port/Nconnection_id/Cflag/ngateway_port/Next_len", $buf);
        echo json_encode([$d, bin2hex(substr($buf, 28, $d['ext_len'])), bin2hex(substr($buf, 28 + $d['ext_len']))]), "\n";
        $ext = '{"connections":{"7":7}}';
        $body = "hi \xff";
        echo bin2hex(pack("NCNnNnNCnN", 28 + strlen($ext) + strlen($body), 6, ip2long("10.0.0.7"), 2900, ip2long("192.168.1.9"), 40000, 7, 1, 8282, strlen($ext)) . $ext . $body), "\n";"#,
        stdin.as_bytes(),
    ) else {
        return;
    };
    let read: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    let fields = &read[0];
    assert_eq!(fields["pack_len"], packet.encoded_len());
    assert_eq!(fields["cmd"], packet.cmd);
    assert_eq!(fields["local_ip"], packet.local_ip);
    assert_eq!(fields["local_port"], packet.local_port);
    assert_eq!(fields["client_ip"], packet.client_ip);
    assert_eq!(fields["client_port"], packet.client_port);
    assert_eq!(fields["connection_id"], packet.connection_id);
    assert_eq!(fields["flag"], packet.flag);
    assert_eq!(fields["gateway_port"], packet.gateway_port);
    assert_eq!(fields["ext_len"], packet.ext_data.len());
    let hex = |b: &[u8]| b.iter().map(|b| format!("{b:02x}")).collect::<String>();
    assert_eq!(read[1], hex(&packet.ext_data));
    assert_eq!(read[2], hex(&packet.body));

    let php: Vec<u8> = (0..lines[1].len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&lines[1][i..i + 2], 16).unwrap())
        .collect();
    let mut buf = BytesMut::from(&php[..]);
    assert_eq!(
        decode(&mut buf, DEFAULT_MAX_PACKET).unwrap(),
        Some(Packet {
            cmd: cmd::SEND_TO_ALL,
            local_ip: u32::from(std::net::Ipv4Addr::new(10, 0, 0, 7)),
            local_port: 2900,
            client_ip: u32::from(std::net::Ipv4Addr::new(192, 168, 1, 9)),
            client_port: 40000,
            connection_id: 7,
            flag: flag::BODY_IS_SCALAR,
            gateway_port: 8282,
            ext_data: Bytes::from_static(br#"{"connections":{"7":7}}"#),
            body: Bytes::from_static(b"hi \xff"),
        })
    );
}
