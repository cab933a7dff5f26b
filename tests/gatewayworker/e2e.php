<?php
// Calls every GatewayClient method the tests check against a gatecast
// cluster, through GatewayLite (the Register, then the gateway protocol),
// and prints what the queries answered as JSON.
// usage: php e2e.php <register address> <secret key> '["<a>","<b>","<c>"]'
//   a and b are connections on one node, c on another.

require __DIR__ . '/GatewayLite.php';

$g = new GatewayLite($argv[1], $argv[2]);
[$a, $b, $c] = json_decode($argv[3], true);

function sorted(array $items): array
{
    $items = array_values($items);
    sort($items);
    return $items;
}

$out = [];
$out['addresses'] = count($g->addresses());

$g->bindUid($a, 'alice');
$g->bindUid($c, 'alice');
$g->bindUid($b, 42);
$g->joinGroup($a, 'room');
$g->joinGroup($c, 'room');
$g->joinGroup($b, 'other');
$g->setSession($a, ['name' => 'ann', 'tags' => ['x', 'y']]);
$g->updateSession($a, ['age' => 3, 'tags' => ['z']]);

$out['is_online_c'] = $g->isOnline($c);
$out['is_uid_online'] = $g->isUidOnline('alice');
$out['client_ids_of_alice'] = sorted($g->getClientIdByUid('alice'));
$out['count_room'] = $g->getClientCountByGroup('room');
$out['count_all'] = $g->getClientCountByGroup('');
$out['list_room'] = sorted($g->getClientIdListByGroup('room'));
$out['uid_of_b'] = $g->getUidByClientId($b);
$out['session_a'] = $g->getSession($a);
$out['groups'] = sorted($g->getAllGroupIdList());
$out['batch_counts'] = $g->batchGetClientCountByGroup(['room', 'other', 'none']);
$out['sessions_room'] = $g->getClientSessionsByGroup('room');
$out['all_sessions'] = count($g->getAllClientSessions());

$g->sendToGroup('room', 'hello room', [$c]);
$g->sendToUid('alice', 'hello alice');
$g->sendToAll('hello all', null, [$b]);
$g->sendToAll('only b', [$b]);
$g->sendToClient($c, 'just c');

$g->leaveGroup($a, 'room');
$out['count_room_after_leave'] = $g->getClientCountByGroup('room');
$g->ungroup('other');
$out['groups_after_ungroup'] = sorted($g->getAllGroupIdList());
$g->unbindUid($b, 42);
$out['uid_of_b_after_unbind'] = $g->getUidByClientId($b);
$g->closeClient($c, 'bye c');

echo json_encode($out), "\n";
