/* sk_skb verdict on the agent's pooled upstream sockets (map dp_up).
 *
 * Owner: K2. Attached by fastpath/loader.py to dp_up without a stream parser
 * (SK_SKB_VERDICT), so every received segment comes here as is. The response
 * bytes go straight into the receive queue of the client socket the upstream
 * is bound to (dp_peer, set by sk_msg.c): the agent never reads them. An
 * upstream with no client (idle in its pool) drops what it receives; the agent
 * sees the EOF of a closing upstream and replaces the socket.
 */

int dp_skb_verdict(struct __sk_buff *skb)
{
    if (!skb->len)
        return dp_close_eof(skb); /* a FIN: dropped, but an agent's EOF carrier's */
    __u64 up = bpf_get_socket_cookie(skb);
    struct dp_peer_val *client = dp_peer.lookup(&up);
    if (!client)
        return SK_DROP;
    __u64 ck = client->client;
    __u32 first = client->wait; /* this skb starts a response (dp_close.h) */
    dp_reset_answered(client); /* a response byte: a close of U now is no reset */
    dp_close_response_skb(skb, up, client, first); /* how much of the response is left */
    dp_lr_response(up, client); /* whole, or its end unseen: no longer in flight */
    dp_outlier_response(up, client); /* its status, from the head dp_close copied */
    if (dp_tmo_response(up, skb->len))
        return SK_DROP; /* timed out: the agent answered 504 and closes U */
    return dp_cli.sk_redirect_hash(skb, &ck, BPF_F_INGRESS);
}
