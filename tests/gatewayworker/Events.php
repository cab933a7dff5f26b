<?php
// An Events.php as GatewayWorker applications write it: bind a uid at
// connect, join the room the query string names, echo each message to the
// sender's room with what the worker knows of the sender.

final class Events
{
    public static function onConnect(string $clientId): void
    {
        $uid = 'user-' . $clientId;
        Gateway::bindUid($clientId, $uid);
        $_SESSION = ['uid' => $uid];
        echo "event connect $clientId\n";
    }

    public static function onWebSocketConnect(string $clientId, array $data): void
    {
        $room = $data['get']['room'] ?? 'lobby';
        Gateway::joinGroup($clientId, $room);
        $_SESSION['room'] = $room;
        $_SESSION['agent'] = $data['server']['HTTP_USER_AGENT'] ?? '';
        echo "event websocket-connect $clientId room=$room\n";
    }

    public static function onMessage(string $clientId, string $message): void
    {
        $reply = json_encode([
            'from' => $clientId,
            'worker' => Worker::$instance->name,
            'uid' => $_SESSION['uid'] ?? null,
            'room' => $_SESSION['room'] ?? null,
            'agent' => $_SESSION['agent'] ?? null,
            'addr' => $_SERVER['REMOTE_ADDR'],
            'port' => $_SERVER['REMOTE_PORT'],
            'gateway_client_id' => $_SERVER['GATEWAY_CLIENT_ID'],
            'text' => $message,
        ]);
        if ($message === 'whoami') {
            Gateway::sendToCurrentClient($reply);
        } else {
            Gateway::sendToGroup($_SESSION['room'], $reply);
        }
        echo "event message $clientId\n";
    }

    public static function onClose(string $clientId): void
    {
        $room = $_SESSION['room'] ?? '';
        echo "event close $clientId room=$room\n";
    }
}
