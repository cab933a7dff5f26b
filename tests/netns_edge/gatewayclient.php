<?php
// A PHP backend on a host of its own (tests/netns_edge.rs): it knows only
// the Register's address, gets every node's inner address from it, and
// drives clients on every node through them.
//
// usage: php gatewayclient.php '<registers JSON>' '<clients JSON>'
//   registers: ["ip:port", ...] (GatewayClient's registerAddress: the
//   first that answers is used)
//   clients: [[x, y], ...] two client_ids per node; x gets uid "u<k>" and
//   group "g", y nothing.
// With GATECAST_GATEWAYCLIENT=<dir of walkor/GatewayClient> it uses that
// library (GatewayClient\Gateway); without, the tests' GatewayLite, which
// speaks the same wire format. Prints what it saw as one JSON object, also
// when a call fails half-way (then without "done").

$registers = json_decode($argv[1], true);
$clients = json_decode($argv[2], true);
$dir = getenv('GATECAST_GATEWAYCLIENT');

if ($dir) {
    require $dir . '/Gateway.php';
    class G extends \GatewayClient\Gateway
    {
        public static function addresses(): array
        {
            return static::getAllGatewayAddressesFromRegister();
        }
    }
    G::$registerAddress = $registers;
    $library = 'GatewayClient';
    $call = fn(string $method, ...$args) => G::$method(...$args);
} else {
    require __DIR__ . '/../gatewayworker/GatewayLite.php';
    // The first Register that answers, as GatewayClient picks one.
    $lite = null;
    foreach ($registers as $register) {
        try {
            $candidate = new GatewayLite($register);
            $candidate->addresses();
            $lite = $candidate;
            break;
        } catch (Exception $e) {
        }
    }
    if ($lite === null) {
        throw new Exception('no Register answers: ' . json_encode($registers));
    }
    $library = 'GatewayLite';
    $call = function (string $method, ...$args) use ($lite) {
        if ($method === 'getAllClientIdCount') {
            return $lite->getClientCountByGroup('');
        }
        return $lite->$method(...$args);
    };
}

function sorted($items): array
{
    $items = array_values((array)$items);
    sort($items);
    return $items;
}

$out = ['library' => $library];
// Printed even when a call dies half-way: what was answered until then.
register_shutdown_function(function () use (&$out) {
    echo json_encode($out), "\n";
});
$out['addresses'] = sorted($call('addresses'));

// Membership written through each node's own inner address (the one in the
// client_id).
foreach ($clients as $k => [$x, $y]) {
    $call('bindUid', $x, "u$k");
    $call('joinGroup', $x, 'g');
}
$out['count_all'] = $call('getAllClientIdCount');
$out['count_g'] = $call('getClientCountByGroup', 'g');
$out['list_g'] = sorted($call('getClientIdListByGroup', 'g'));
foreach ($clients as $k => [$x, $y]) {
    $out["uid_online_$k"] = $call('isUidOnline', "u$k");
    $out["client_ids_of_u$k"] = sorted($call('getClientIdByUid', "u$k"));
    $out["online_y$k"] = $call('isOnline', $y);
}
$out['uid_online_nobody'] = $call('isUidOnline', 'nobody');

// Pushes: one per uid, one per client, one to the group, one to all.
foreach ($clients as $k => [$x, $y]) {
    $call('sendToUid', "u$k", "to-u$k");
    $call('sendToClient', $y, "to-y$k");
}
$call('sendToGroup', 'g', 'to-g');
$call('sendToAll', 'to-all');
$out['done'] = true;
