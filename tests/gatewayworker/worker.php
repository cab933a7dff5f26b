<?php
// A small BusinessWorker for the tests, written for gatecast (not a copy of
// GatewayWorker's): it does what GatewayWorker's BusinessWorker does on the
// wire. It asks the Register (worker_connect) for the gateways and follows
// its updates, connects to every gateway's inner port with WORKER_CONNECT,
// reads events (connect 1, message 3, close 4, websocket-connect 205), runs
// the handler in Events.php with $_SERVER, $_SESSION and the client_id set
// as BusinessWorker sets them, writes $_SESSION back with SET_SESSION when
// the handler changed it, and sends the handler's commands on the gateway
// connections.
//
// usage: php worker.php REGISTER_ADDRESS WORKER_NAME [SECRET_KEY]
// Prints one line per event handled ("event <name> <client_id> ...").

require __DIR__ . '/Events.php';

final class Worker
{
    const ON_CONNECT = 1;
    const ON_MESSAGE = 3;
    const ON_CLOSE = 4;
    const SEND_TO_ONE = 5;
    const BIND_UID = 12;
    const JOIN_GROUP = 20;
    const SEND_TO_GROUP = 22;
    const WORKER_CONNECT = 200;
    const PING = 201;
    const SET_SESSION = 204;
    const ON_WEBSOCKET_CONNECT = 205;
    const HEAD_LEN = 28;

    /** @var array<string, resource> inner address => connection */
    private array $gateways = [];
    /** @var array<string, string> inner address => unread bytes */
    private array $buffers = [];
    /** @var array<string, int> client_id => crc32 of the session it has */
    private array $versions = [];
    private $register;
    private string $registerBuffer = '';

    /** The gateway connection the current event came from. */
    public static ?string $current = null;
    public static ?string $clientId = null;
    public static ?Worker $instance = null;

    public function __construct(
        private string $registerAddress,
        public string $name,
        public string $secretKey = ''
    ) {
        self::$instance = $this;
    }

    public function run(): void
    {
        $this->register = $this->connect($this->registerAddress);
        fwrite($this->register, json_encode(['event' => 'worker_connect', 'secret_key' => $this->secretKey]) . "\n");
        while (true) {
            $read = array_values($this->gateways);
            $read[] = $this->register;
            $write = $except = null;
            if (stream_select($read, $write, $except, 30) === false) {
                throw new Exception('select failed');
            }
            foreach ($read as $stream) {
                if ($stream === $this->register) {
                    $this->readRegister();
                    continue;
                }
                $address = array_search($stream, $this->gateways, true);
                $data = fread($stream, 65536);
                if ($data === '' || $data === false) {
                    fclose($stream);
                    unset($this->gateways[$address], $this->buffers[$address]);
                    continue;
                }
                $this->buffers[$address] .= $data;
                $this->readPackets($address);
            }
        }
    }

    private function connect(string $address)
    {
        // Workerman sets TCP_NODELAY on its connections: without it a
        // second small write (the session after a bindUid) would wait for
        // the first one's ACK while a query on a new connection overtakes it.
        $context = stream_context_create(['socket' => ['tcp_nodelay' => true]]);
        $s = stream_socket_client("tcp://$address", $errno, $err, 3, STREAM_CLIENT_CONNECT, $context);
        if (!$s) {
            throw new Exception("$address unreachable: $err");
        }
        return $s;
    }

    private function readRegister(): void
    {
        $data = fread($this->register, 65536);
        if ($data === '' || $data === false) {
            throw new Exception('the Register closed the connection');
        }
        $this->registerBuffer .= $data;
        while (($end = strpos($this->registerBuffer, "\n")) !== false) {
            $line = substr($this->registerBuffer, 0, $end);
            $this->registerBuffer = substr($this->registerBuffer, $end + 1);
            $message = json_decode($line, true);
            if (($message['event'] ?? '') !== 'broadcast_addresses') {
                continue;
            }
            foreach ($message['addresses'] as $address) {
                if (!isset($this->gateways[$address])) {
                    $this->gateways[$address] = $this->connect($address);
                    $this->buffers[$address] = '';
                    $body = json_encode(['worker_key' => "{$this->name}:0", 'secret_key' => $this->secretKey]);
                    fwrite($this->gateways[$address], self::encode(self::WORKER_CONNECT, 0, '', $body));
                    echo "connected $address\n";
                }
            }
        }
    }

    private function readPackets(string $address): void
    {
        $buffer = &$this->buffers[$address];
        while (strlen($buffer) >= self::HEAD_LEN) {
            $len = unpack('N', $buffer)[1];
            if (strlen($buffer) < $len) {
                return;
            }
            $head = unpack('Npack_len/Ccmd/Nlocal_ip/nlocal_port/Nclient_ip/nclient_port/Nconnection_id/Cflag/ngateway_port/Next_len', $buffer);
            $ext = substr($buffer, self::HEAD_LEN, $head['ext_len']);
            $body = substr($buffer, self::HEAD_LEN + $head['ext_len'], $len - self::HEAD_LEN - $head['ext_len']);
            $buffer = substr($buffer, $len);
            if (!($head['flag'] & 1)) {
                $body = unserialize($body);
            }
            $this->handle($address, $head, $ext, $body);
        }
    }

    private function handle(string $address, array $head, string $ext, $body): void
    {
        if ($head['cmd'] === self::PING) {
            return;
        }
        self::$current = $address;
        self::$clientId = bin2hex(pack('NnN', $head['local_ip'], $head['local_port'], $head['connection_id']));
        $_SERVER = [
            'REMOTE_ADDR' => long2ip($head['client_ip']),
            'REMOTE_PORT' => $head['client_port'],
            'GATEWAY_ADDR' => long2ip($head['local_ip']),
            'GATEWAY_PORT' => $head['gateway_port'],
            'GATEWAY_CLIENT_ID' => self::$clientId,
        ];
        $cid = self::$clientId;
        // As BusinessWorker does: an event sent before this worker's last
        // session write carries an older session; ask the gateway for the
        // current one.
        if ($head['cmd'] !== self::ON_CLOSE && isset($this->versions[$cid]) && $this->versions[$cid] !== crc32($ext)) {
            $old = $_SESSION = Gateway::getSession($cid);
            $this->versions[$cid] = crc32($ext);
        } else {
            $this->versions[$cid] ??= crc32($ext);
            $old = $_SESSION = $ext === '' ? null : unserialize($ext);
        }
        switch ($head['cmd']) {
            case self::ON_CONNECT:
                Events::onConnect(self::$clientId);
                break;
            case self::ON_WEBSOCKET_CONNECT:
                Events::onWebSocketConnect(self::$clientId, $body);
                break;
            case self::ON_MESSAGE:
                Events::onMessage(self::$clientId, $body);
                break;
            case self::ON_CLOSE:
                unset($this->versions[$cid]);
                Events::onClose(self::$clientId);
                break;
        }
        if ($_SESSION !== $old && $head['cmd'] !== self::ON_CLOSE) {
            $session = $_SESSION === null ? '' : serialize($_SESSION);
            $this->sendTo($address, self::encode(self::SET_SESSION, $head['connection_id'], $session, ''));
            $this->versions[$cid] = crc32($session);
        }
    }

    public function sendTo(string $address, string $packet): void
    {
        if (isset($this->gateways[$address])) {
            fwrite($this->gateways[$address], $packet);
        }
    }

    public function sendToAll(string $packet): void
    {
        foreach ($this->gateways as $gateway) {
            fwrite($gateway, $packet);
        }
    }

    public static function encode(int $cmd, int $connectionId, string $ext, string $body): string
    {
        $len = self::HEAD_LEN + strlen($ext) + strlen($body);
        return pack('NCNnNnNCnN', $len, $cmd, 0, 0, 0, 0, $connectionId, 1, 0, strlen($ext)) . $ext . $body;
    }
}

/** The part of GatewayWorker's Gateway:: a BusinessWorker's handler calls. */
final class Gateway
{
    private static function connectionId(string $clientId): int
    {
        return unpack('N', hex2bin(substr($clientId, 12)))[1];
    }

    private static function address(string $clientId): string
    {
        $a = unpack('Nip/nport', hex2bin(substr($clientId, 0, 12)));
        return long2ip($a['ip']) . ':' . $a['port'];
    }

    private static function toClient(string $clientId, int $cmd, string $ext, string $body): void
    {
        Worker::$instance->sendTo(self::address($clientId), Worker::encode($cmd, self::connectionId($clientId), $ext, $body));
    }

    /** A query on its own connection, as BusinessWorker's Gateway:: asks. */
    public static function getSession(string $clientId)
    {
        $s = stream_socket_client('tcp://' . self::address($clientId), $errno, $err, 3);
        if (!$s) {
            throw new Exception("gateway unreachable: $err");
        }
        stream_set_timeout($s, 5);
        $auth = json_encode(['secret_key' => Worker::$instance->secretKey]);
        fwrite($s, Worker::encode(202, 0, '', $auth) . Worker::encode(203, self::connectionId($clientId), '', ''));
        $reply = '';
        while (strlen($reply) < 4 || strlen($reply) < 4 + unpack('N', $reply)[1]) {
            $chunk = fread($s, 65536);
            if ($chunk === '' || $chunk === false) {
                throw new Exception('gateway closed before answering getSession');
            }
            $reply .= $chunk;
        }
        fclose($s);
        return unserialize(substr($reply, 4));
    }

    public static function bindUid(string $clientId, string $uid): void
    {
        self::toClient($clientId, Worker::BIND_UID, $uid, '');
    }

    public static function joinGroup(string $clientId, string $group): void
    {
        self::toClient($clientId, Worker::JOIN_GROUP, $group, '');
    }

    public static function sendToCurrentClient(string $message): void
    {
        self::toClient(Worker::$clientId, Worker::SEND_TO_ONE, '', $message);
    }

    public static function sendToGroup(string $group, string $message): void
    {
        $ext = json_encode(['group' => [$group], 'exclude' => null]);
        Worker::$instance->sendToAll(Worker::encode(Worker::SEND_TO_GROUP, 0, $ext, $message));
    }
}

[$script, $register, $name] = $argv;
(new Worker($register, $name, $argv[3] ?? ''))->run();
