<?php
/**
 * Look up one shop through the sidecar and print the result as JSON.
 *
 * Usage: php example.php [--product=NAME] [--timeout-ms=N] [--on-unavailable=deny|allow]
 *                        TARGET SHOP_ID
 *
 * TARGET is the lookup listener: a URL such as http://127.0.0.1:7481, or the
 * path of its unix socket (an absolute path, or one prefixed with "unix:").
 * Prints one line, {"entitled": bool, "entitlement": object|null,
 * "error": string|null}, and exits 0; bad arguments exit 2.
 */

require __DIR__ . '/EntitlementClient.php';

function usage(string $problem): void
{
    fwrite(STDERR, $problem . "\n");
    fwrite(STDERR, "usage: php example.php [--product=NAME] [--timeout-ms=N]"
        . " [--on-unavailable=deny|allow] TARGET SHOP_ID\n");
    exit(2);
}

$flags = getopt('', ['product:', 'timeout-ms:', 'on-unavailable:'], $firstArgument);
$arguments = array_slice($argv, $firstArgument);
if (count($arguments) !== 2) {
    usage('Expected TARGET and SHOP_ID, got ' . count($arguments) . ' arguments.');
}
list($target, $shopId) = $arguments;

$options = [];
if (strpos($target, 'unix:') === 0) {
    $options['unix_socket'] = substr($target, strlen('unix:'));
} elseif (strpos($target, '/') === 0) {
    $options['unix_socket'] = $target;
} else {
    $options['base_url'] = $target;
}
if (isset($flags['product'])) {
    $options['product'] = $flags['product'];
}
if (isset($flags['timeout-ms'])) {
    // Left as a string when it is not a number, so the client reports it.
    $timeoutMs = $flags['timeout-ms'];
    $options['timeout_ms'] = ctype_digit($timeoutMs) ? (int) $timeoutMs : $timeoutMs;
}
if (isset($flags['on-unavailable'])) {
    $options['on_unavailable'] = $flags['on-unavailable'];
}

try {
    $client = new EntitlementClient($options);
} catch (InvalidArgumentException $error) {
    usage($error->getMessage());
}

// Both calls share one request to the sidecar: answers are memoised.
$entitlement = $client->getEntitlement($shopId);
$entitled = $client->isEntitled($shopId);

echo json_encode(
    ['entitled' => $entitled, 'entitlement' => $entitlement, 'error' => $client->lastError()],
    JSON_UNESCAPED_SLASHES
), "\n";
