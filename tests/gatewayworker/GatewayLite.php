<?php
// A small client for the tests that speaks GatewayWorker's wire format the
// way GatewayClient does (walkor/GatewayClient): ask the Register for the
// gateways' inner addresses, then one TCP connection per call to the node a
// client_id names (or to every node), the 28-byte big-endian header, and
// replies as a 4-byte length followed by PHP serialize(). Written for
// gatecast's tests; not a copy of GatewayClient.

final class GatewayLite
{
    const SEND_TO_ONE = 5;
    const SEND_TO_ALL = 6;
    const KICK = 7;
    const DESTROY = 8;
    const UPDATE_SESSION = 9;
    const GET_ALL_CLIENT_SESSIONS = 10;
    const IS_ONLINE = 11;
    const BIND_UID = 12;
    const UNBIND_UID = 13;
    const SEND_TO_UID = 14;
    const GET_CLIENT_ID_BY_UID = 15;
    const BATCH_GET_CLIENT_ID_BY_UID = 16;
    const JOIN_GROUP = 20;
    const LEAVE_GROUP = 21;
    const SEND_TO_GROUP = 22;
    const GET_CLIENT_SESSIONS_BY_GROUP = 23;
    const GET_CLIENT_COUNT_BY_GROUP = 24;
    const SELECT = 25;
    const GET_GROUP_ID_LIST = 26;
    const UNGROUP = 27;
    const BATCH_GET_CLIENT_COUNT_BY_GROUP = 28;
    const GATEWAY_CLIENT_CONNECT = 202;
    const GET_SESSION_BY_CLIENT_ID = 203;
    const SET_SESSION = 204;
    const FLAG_BODY_IS_SCALAR = 1;

    public function __construct(private string $register, private string $secretKey = '')
    {
    }

    /** The gateways' inner addresses, from the Register. */
    public function addresses(): array
    {
        $s = stream_socket_client("tcp://{$this->register}", $errno, $err, 3);
        if (!$s) {
            throw new Exception("register unreachable: $err");
        }
        fwrite($s, json_encode(['event' => 'worker_connect', 'secret_key' => $this->secretKey]) . "\n");
        stream_set_timeout($s, 5);
        $line = fgets($s);
        fclose($s);
        $data = json_decode((string)$line, true);
        if (($data['event'] ?? '') !== 'broadcast_addresses') {
            throw new Exception("register answered " . var_export($line, true));
        }
        return $data['addresses'];
    }

    private static function split(string $clientId): array
    {
        $a = unpack('Nip/nport/Nconn', hex2bin($clientId));
        return [long2ip($a['ip']) . ':' . $a['port'], $a['conn']];
    }

    private static function clientId(string $address, int $conn): string
    {
        [$ip, $port] = explode(':', $address);
        return bin2hex(pack('NnN', ip2long($ip), (int)$port, $conn));
    }

    private function packet(int $cmd, int $conn = 0, $body = '', string $ext = ''): string
    {
        $flag = is_scalar($body) ? self::FLAG_BODY_IS_SCALAR : 0;
        if (!$flag) {
            $body = serialize($body);
        }
        $body = (string)$body;
        $packet = pack('NCNnNnNCnN', 28 + strlen($ext) + strlen($body), $cmd, 0, 0, 0, 0, $conn, $flag, 0, strlen($ext)) . $ext . $body;
        if ($this->secretKey !== '') {
            $auth = json_encode(['secret_key' => $this->secretKey]);
            $packet = pack('NCNnNnNCnN', 28 + strlen($auth), self::GATEWAY_CLIENT_CONNECT, 0, 0, 0, 0, 0, self::FLAG_BODY_IS_SCALAR, 0, 0) . $auth . $packet;
        }
        return $packet;
    }

    private function send(string $address, string $packet): void
    {
        $s = stream_socket_client("tcp://$address", $errno, $err, 3);
        if (!$s) {
            throw new Exception("gateway $address unreachable: $err");
        }
        fwrite($s, $packet);
        fclose($s);
    }

    /** Sends to every gateway and reads each one's answer, keyed by address. */
    private function ask(int $cmd, string $ext = ''): array
    {
        $answers = [];
        foreach ($this->addresses() as $address) {
            $answers[$address] = $this->askOne($address, $this->packet($cmd, 0, '', $ext));
        }
        return $answers;
    }

    private function askOne(string $address, string $packet)
    {
        $s = stream_socket_client("tcp://$address", $errno, $err, 3);
        if (!$s) {
            throw new Exception("gateway $address unreachable: $err");
        }
        fwrite($s, $packet);
        stream_set_timeout($s, 5);
        $buf = '';
        while (strlen($buf) < 4 || strlen($buf) < 4 + unpack('N', $buf)[1]) {
            $chunk = fread($s, 65536);
            if ($chunk === '' || $chunk === false) {
                throw new Exception("gateway $address closed before answering");
            }
            $buf .= $chunk;
        }
        fclose($s);
        return unserialize(substr($buf, 4));
    }

    private function toClient(string $clientId, int $cmd, $body = '', string $ext = ''): void
    {
        [$address, $conn] = self::split($clientId);
        $this->send($address, $this->packet($cmd, $conn, $body, $ext));
    }

    private function toAll(int $cmd, $body = '', string $ext = ''): void
    {
        foreach ($this->addresses() as $address) {
            $this->send($address, $this->packet($cmd, 0, $body, $ext));
        }
    }

    public function sendToClient(string $clientId, string $message): void
    {
        $this->toClient($clientId, self::SEND_TO_ONE, $message);
    }

    public function sendToAll(string $message, ?array $only = null, ?array $exclude = null): void
    {
        if ($only !== null) {
            $byAddress = [];
            foreach ($only as $id) {
                [$address, $conn] = self::split($id);
                $byAddress[$address][$conn] = $conn;
            }
            foreach ($byAddress as $address => $conns) {
                $this->send($address, $this->packet(self::SEND_TO_ALL, 0, $message, json_encode(['connections' => $conns])));
            }
            return;
        }
        $excludeBy = [];
        foreach ($exclude ?? [] as $id) {
            [$address, $conn] = self::split($id);
            $excludeBy[$address][$conn] = $conn;
        }
        foreach ($this->addresses() as $address) {
            $ext = isset($excludeBy[$address]) ? json_encode(['exclude' => $excludeBy[$address]]) : '';
            $this->send($address, $this->packet(self::SEND_TO_ALL, 0, $message, $ext));
        }
    }

    public function sendToUid($uids, string $message): void
    {
        $this->toAll(self::SEND_TO_UID, $message, json_encode((array)$uids));
    }

    public function sendToGroup($groups, string $message, ?array $exclude = null): void
    {
        $excludeBy = [];
        foreach ($exclude ?? [] as $id) {
            [$address, $conn] = self::split($id);
            $excludeBy[$address][$conn] = $conn;
        }
        foreach ($this->addresses() as $address) {
            $ext = json_encode(['group' => (array)$groups, 'exclude' => $excludeBy[$address] ?? null]);
            $this->send($address, $this->packet(self::SEND_TO_GROUP, 0, $message, $ext));
        }
    }

    public function closeClient(string $clientId, ?string $message = null): void
    {
        $this->toClient($clientId, self::KICK, $message ?? '');
    }

    public function destroyClient(string $clientId): void
    {
        $this->toClient($clientId, self::DESTROY);
    }

    public function bindUid(string $clientId, $uid): void
    {
        $this->toClient($clientId, self::BIND_UID, '', (string)$uid);
    }

    public function unbindUid(string $clientId, $uid): void
    {
        $this->toClient($clientId, self::UNBIND_UID, '', (string)$uid);
    }

    public function joinGroup(string $clientId, $group): void
    {
        $this->toClient($clientId, self::JOIN_GROUP, '', (string)$group);
    }

    public function leaveGroup(string $clientId, $group): void
    {
        $this->toClient($clientId, self::LEAVE_GROUP, '', (string)$group);
    }

    public function ungroup($group): void
    {
        $this->toAll(self::UNGROUP, '', (string)$group);
    }

    public function setSession(string $clientId, array $session): void
    {
        $this->toClient($clientId, self::SET_SESSION, '', serialize($session));
    }

    public function updateSession(string $clientId, array $session): void
    {
        $this->toClient($clientId, self::UPDATE_SESSION, '', serialize($session));
    }

    public function getSession(string $clientId)
    {
        [$address, $conn] = self::split($clientId);
        return $this->askOne($address, $this->packet(self::GET_SESSION_BY_CLIENT_ID, $conn));
    }

    public function isOnline(string $clientId): int
    {
        [$address, $conn] = self::split($clientId);
        return (int)$this->askOne($address, $this->packet(self::IS_ONLINE, $conn));
    }

    /** [client_id => client_id] */
    public function getClientIdByUid($uid): array
    {
        $out = [];
        foreach ($this->ask(self::GET_CLIENT_ID_BY_UID, (string)$uid) as $address => $conns) {
            foreach ((array)$conns as $conn) {
                $id = self::clientId($address, $conn);
                $out[$id] = $id;
            }
        }
        return $out;
    }

    public function isUidOnline($uid): int
    {
        return (int)!empty($this->getClientIdByUid($uid));
    }

    public function getClientCountByGroup(string $group = ''): int
    {
        return array_sum($this->ask(self::GET_CLIENT_COUNT_BY_GROUP, $group));
    }

    public function batchGetClientCountByGroup(array $groups): array
    {
        $out = [];
        foreach ($this->ask(self::BATCH_GET_CLIENT_COUNT_BY_GROUP, json_encode($groups)) as $counts) {
            foreach ((array)$counts as $group => $n) {
                $out[$group] = ($out[$group] ?? 0) + $n;
            }
        }
        return $out;
    }

    /** [client_id => session array] */
    public function getClientSessionsByGroup(string $group): array
    {
        return $this->sessions($this->ask(self::GET_CLIENT_SESSIONS_BY_GROUP, $group));
    }

    /** [client_id => session array] */
    public function getAllClientSessions(): array
    {
        return $this->sessions($this->ask(self::GET_ALL_CLIENT_SESSIONS));
    }

    private function sessions(array $answers): array
    {
        $out = [];
        foreach ($answers as $address => $sessions) {
            foreach ((array)$sessions as $conn => $session) {
                $out[self::clientId($address, $conn)] = $session ? unserialize($session) : [];
            }
        }
        return $out;
    }

    /** [client_id => ['uid' => ..., 'groups' => ...]] from SELECT */
    public function select(array $fields, array $where): array
    {
        $out = [];
        foreach ($this->ask(self::SELECT, json_encode(['fields' => $fields, 'where' => $where])) as $address => $rows) {
            foreach ((array)$rows as $conn => $row) {
                $out[self::clientId($address, $conn)] = $row;
            }
        }
        return $out;
    }

    public function getClientIdListByGroup(string $group): array
    {
        $ids = array_keys($this->select(['uid'], ['groups' => [$group]]));
        return array_combine($ids, $ids) ?: [];
    }

    public function getUidByClientId(string $clientId)
    {
        [$address, $conn] = self::split($clientId);
        $rows = $this->askOne($address, $this->packet(self::SELECT, 0, '', json_encode(['fields' => ['uid'], 'where' => ['connection_id' => [$conn]]])));
        return $rows[$conn]['uid'] ?? null;
    }

    public function getAllGroupIdList(): array
    {
        $out = [];
        foreach ($this->ask(self::GET_GROUP_ID_LIST) as $groups) {
            foreach ((array)$groups as $group) {
                $out[$group] = $group;
            }
        }
        return $out;
    }
}
