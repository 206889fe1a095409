<?php
/**
 * Client for the entitlement sidecar's lookup listener.
 *
 * Needs PHP 7.2 or newer with ext-curl and ext-json, and nothing else, so a
 * PrestaShop module can ship this one file.
 *
 *     $client = new EntitlementClient(['base_url' => 'http://127.0.0.1:7481']);
 *     if (!$client->isEntitled($shopId)) {
 *         // hide the paid features
 *     }
 *
 * Answers are memoised per instance, by shop id: keep one instance per PHP
 * request and a page asks the sidecar at most once per shop, even when the
 * sidecar is down.
 */
final class EntitlementClient
{
    /** The shop ids the sidecar accepts; anything else is rejected locally. */
    const SHOP_ID_PATTERN = '/\A[A-Za-z0-9_-]{1,64}\z/';

    const DEFAULT_BASE_URL = 'http://127.0.0.1:7481';

    const DEFAULT_TIMEOUT_MS = 100;

    private const KNOWN_OPTIONS = ['base_url', 'unix_socket', 'product', 'timeout_ms', 'on_unavailable'];

    /** @var string */
    private $baseUrl;

    /** @var string|null */
    private $unixSocket;

    /** @var string|null */
    private $product;

    /** @var int */
    private $timeoutMs;

    /** @var bool */
    private $allowWhenUnavailable;

    /**
     * Answers already received, by shop id.
     *
     * @var array<string, array{entitlement: array|null, error: string|null, unavailable: bool}>
     */
    private $answers = [];

    /** @var string|null */
    private $lastError;

    /** @var resource|\CurlHandle|null */
    private $curl;

    /**
     * Build a client from an options array.
     *
     * - `base_url`: the lookup listener over TCP, default `http://127.0.0.1:7481`;
     * - `unix_socket`: path of the lookup listener's unix socket, instead of base_url;
     * - `product`: sent as `?product=`; the sidecar's default product when absent;
     * - `timeout_ms`: limit for connecting and for the whole request, default 100;
     * - `on_unavailable`: `deny` (default) or `allow`, what isEntitled() answers
     *   when the sidecar cannot give an answer.
     *
     * @param array<string, mixed> $options
     *
     * @throws InvalidArgumentException when an option is unknown or has a bad value
     */
    public function __construct(array $options = [])
    {
        $unknown = array_diff(array_keys($options), self::KNOWN_OPTIONS);
        if ($unknown) {
            throw new InvalidArgumentException(sprintf(
                'Unknown option %s; expected one of %s.',
                self::describe(reset($unknown)),
                implode(', ', self::KNOWN_OPTIONS)
            ));
        }

        // An option set to null counts as absent, so callers can pass their
        // configuration through without filtering it.
        $baseUrl = $options['base_url'] ?? null;
        $unixSocket = $options['unix_socket'] ?? null;
        if ($baseUrl !== null && $unixSocket !== null) {
            throw new InvalidArgumentException(sprintf(
                'Options base_url (%s) and unix_socket (%s) exclude each other; give one.',
                self::describe($baseUrl),
                self::describe($unixSocket)
            ));
        }

        if ($unixSocket !== null) {
            $this->unixSocket = self::checkUnixSocket($unixSocket);
            // curl still wants a URL; its host only fills the Host header.
            $this->baseUrl = 'http://localhost';
        } else {
            $this->baseUrl = self::checkBaseUrl($baseUrl ?? self::DEFAULT_BASE_URL);
        }

        $this->product = self::checkProduct($options['product'] ?? null);
        $this->timeoutMs = self::checkTimeoutMs($options['timeout_ms'] ?? self::DEFAULT_TIMEOUT_MS);
        $this->allowWhenUnavailable = self::checkOnUnavailable($options['on_unavailable'] ?? 'deny');
    }

    /**
     * Tell whether the shop is entitled to the product right now.
     *
     * False for an unknown shop, for a shop id the sidecar would reject and
     * for an answer outside the contract (a 400, say). When the sidecar is
     * unavailable (unreachable, too slow, a 5xx answer or a body that is not
     * the expected JSON), the `on_unavailable` option decides. lastError()
     * says what went wrong in both of the last two cases.
     */
    public function isEntitled(string $shopId): bool
    {
        $answer = $this->answerFor($shopId);

        if ($answer['entitlement'] !== null) {
            return $answer['entitlement']['entitled'] === true;
        }

        return $answer['unavailable'] && $this->allowWhenUnavailable;
    }

    /**
     * Return the sidecar's entitlement record for the shop.
     *
     * The record is the decoded JSON of `GET /entitlement/<shop>`: shop_id,
     * product, entitled, plan, status, in_trial, trial_end, current_term_end,
     * updated_at and reason. Null for an unknown shop, for a shop id the
     * sidecar would reject, and when the sidecar gave no usable answer (see
     * lastError()).
     *
     * @return array<string, mixed>|null
     */
    public function getEntitlement(string $shopId): ?array
    {
        return $this->answerFor($shopId)['entitlement'];
    }

    /**
     * Say why the last lookup got no usable answer from the sidecar.
     *
     * Null when the last isEntitled() or getEntitlement() call got a record,
     * an unknown shop, or a shop id rejected locally; otherwise a short
     * sentence for a log line, such as "Could not reach the sidecar at
     * http://127.0.0.1:7481: Connection refused.".
     */
    public function lastError(): ?string
    {
        return $this->lastError;
    }

    /**
     * Return the memoised answer for the shop, asking the sidecar the first time.
     *
     * @return array{entitlement: array|null, error: string|null, unavailable: bool}
     */
    private function answerFor(string $shopId): array
    {
        if (!isset($this->answers[$shopId])) {
            $this->answers[$shopId] = preg_match(self::SHOP_ID_PATTERN, $shopId)
                ? $this->lookUp($shopId)
                : self::answer(null);
        }

        $answer = $this->answers[$shopId];
        $this->lastError = $answer['error'];

        return $answer;
    }

    /**
     * Ask the sidecar about one shop and classify what comes back.
     *
     * @return array{entitlement: array|null, error: string|null, unavailable: bool}
     */
    private function lookUp(string $shopId): array
    {
        $url = $this->baseUrl . '/entitlement/' . rawurlencode($shopId);
        if ($this->product !== null) {
            $url .= '?product=' . rawurlencode($this->product);
        }

        $curl = $this->curlHandle();
        curl_setopt($curl, CURLOPT_URL, $url);
        $body = curl_exec($curl);

        if ($body === false) {
            $where = $this->unixSocket ?? $this->baseUrl;
            $error = curl_errno($curl) === CURLE_OPERATION_TIMEOUTED
                ? sprintf('The sidecar at %s did not answer within %d ms.', $where, $this->timeoutMs)
                : sprintf('Could not reach the sidecar at %s: %s.', $where, curl_error($curl));

            return self::unavailable($error);
        }

        $status = (int) curl_getinfo($curl, CURLINFO_RESPONSE_CODE);
        if ($status >= 500) {
            return self::unavailable(sprintf('The sidecar answered HTTP %d.', $status));
        }

        $record = substr(ltrim($body), 0, 1) === '{' ? json_decode($body, true) : null;
        if (!is_array($record)) {
            return self::unavailable(sprintf('The sidecar answered HTTP %d without a JSON object.', $status));
        }

        if ($status === 200) {
            if (!isset($record['entitled']) || !is_bool($record['entitled'])) {
                return self::unavailable('The sidecar answered HTTP 200 without an "entitled" field.');
            }

            return self::answer($record);
        }
        if ($status === 404) {
            // The sidecar was set to ask the Billing API about shops it does
            // not know, and could not: that is no verdict on the shop.
            if (($record['reason'] ?? null) === 'upstream_unavailable') {
                return self::unavailable('The sidecar could not ask the Billing API about this shop.');
            }

            return self::answer(null);
        }

        // Any other status means this request is wrong (a bad product name, a
        // base_url that is not the sidecar), not that the sidecar is down, so
        // on_unavailable does not apply and the shop is denied.
        return self::answer(null, sprintf('The sidecar answered HTTP %d.', $status));
    }

    /**
     * Return the curl handle, created on first use and reused so that
     * lookups of several shops share one connection.
     *
     * @return resource|\CurlHandle
     */
    private function curlHandle()
    {
        if ($this->curl !== null) {
            return $this->curl;
        }

        $curl = curl_init();
        curl_setopt_array($curl, [
            CURLOPT_RETURNTRANSFER => true,
            CURLOPT_HTTPGET => true,
            CURLOPT_HTTPHEADER => ['Accept: application/json'],
            CURLOPT_FOLLOWLOCATION => false,
            CURLOPT_PROTOCOLS => CURLPROTO_HTTP | CURLPROTO_HTTPS,
            // The sidecar is local: never send a lookup through an http_proxy
            // taken from the environment.
            CURLOPT_PROXY => '',
            CURLOPT_CONNECTTIMEOUT_MS => $this->timeoutMs,
            CURLOPT_TIMEOUT_MS => $this->timeoutMs,
            // Sub-second timeouts need this: otherwise curl's system resolver
            // times out with SIGALRM, in whole seconds, and fails at once
            // when given less than 1000 ms.
            CURLOPT_NOSIGNAL => true,
        ]);
        if ($this->unixSocket !== null) {
            curl_setopt($curl, CURLOPT_UNIX_SOCKET_PATH, $this->unixSocket);
        }

        return $this->curl = $curl;
    }

    /**
     * Record an answer: a record or null, with the reason when there is no record.
     *
     * @return array{entitlement: array|null, error: string|null, unavailable: bool}
     */
    private static function answer(?array $entitlement, ?string $error = null): array
    {
        return ['entitlement' => $entitlement, 'error' => $error, 'unavailable' => false];
    }

    /**
     * Record that the sidecar gave no usable answer, so on_unavailable decides.
     *
     * @return array{entitlement: array|null, error: string|null, unavailable: bool}
     */
    private static function unavailable(string $error): array
    {
        return ['entitlement' => null, 'error' => $error, 'unavailable' => true];
    }

    /**
     * @param mixed $value
     */
    private static function checkBaseUrl($value): string
    {
        $parts = is_string($value) ? parse_url($value) : false;
        $scheme = isset($parts['scheme']) ? strtolower($parts['scheme']) : '';
        if (!in_array($scheme, ['http', 'https'], true) || empty($parts['host'])
            || isset($parts['query']) || isset($parts['fragment'])) {
            throw new InvalidArgumentException(sprintf(
                'Option base_url must be an http:// or https:// URL such as %s, got %s.',
                self::DEFAULT_BASE_URL,
                self::describe($value)
            ));
        }

        return rtrim($value, '/');
    }

    /**
     * @param mixed $value
     */
    private static function checkUnixSocket($value): ?string
    {
        if ($value === null) {
            return null;
        }
        if (!is_string($value) || $value === '' || strpos($value, "\0") !== false) {
            throw new InvalidArgumentException(sprintf(
                'Option unix_socket must be the path of a socket file, got %s.',
                self::describe($value)
            ));
        }

        return $value;
    }

    /**
     * @param mixed $value
     */
    private static function checkProduct($value): ?string
    {
        if ($value === null) {
            return null;
        }
        if (!is_string($value) || $value === '') {
            throw new InvalidArgumentException(sprintf(
                'Option product must be a non-empty string, got %s.',
                self::describe($value)
            ));
        }

        return $value;
    }

    /**
     * @param mixed $value
     */
    private static function checkTimeoutMs($value): int
    {
        if (!is_int($value) || $value < 1) {
            throw new InvalidArgumentException(sprintf(
                'Option timeout_ms must be a positive integer of milliseconds, got %s.',
                self::describe($value)
            ));
        }

        return $value;
    }

    /**
     * @param mixed $value
     */
    private static function checkOnUnavailable($value): bool
    {
        if ($value !== 'deny' && $value !== 'allow') {
            throw new InvalidArgumentException(sprintf(
                "Option on_unavailable must be 'deny' or 'allow', got %s.",
                self::describe($value)
            ));
        }

        return $value === 'allow';
    }

    /**
     * Show a value in an error message the way PHP code would spell it.
     *
     * @param mixed $value
     */
    private static function describe($value): string
    {
        if (is_scalar($value) || $value === null) {
            return var_export($value, true);
        }

        return gettype($value);
    }
}
