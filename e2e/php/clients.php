<?php
// phpredis against one endpoint: SELECT, MULTI/EXEC, and PHP sessions stored
// through phpredis's session handler in database 5.
// Usage: php clients.php PORT. Prints one JSON line; exits non-zero on error.
$port = (int)$argv[1];
$out = [];
$r = new Redis();
$r->connect('127.0.0.1', $port, 5.0);
$r->select(4);
$r->set('shared', 'db4');
$out['multi'] = $r->multi()->set('n', '1')->incrBy('n', 41)->get('n')->exec();
$out['get'] = $r->get('shared');
$r->select(0);
$out['db0'] = $r->get('shared');

ini_set('session.save_handler', 'redis');
ini_set('session.save_path', "tcp://127.0.0.1:$port?database=5");
ini_set('session.use_cookies', '0');
ini_set('session.use_strict_mode', '0');
session_id('phpsess1');
session_start();
$_SESSION['user'] = 'alice';
session_write_close();
$_SESSION = [];
session_id('phpsess1');
session_start();
$out['session'] = $_SESSION['user'] ?? null;
session_write_close();
$r->select(5);
$out['sessionKeys'] = $r->exists('PHPREDIS_SESSION:phpsess1');
$out['sessionTtl'] = $r->ttl('PHPREDIS_SESSION:phpsess1') > 0;
echo json_encode($out), "\n";
