/* sk_msg on the agent's injector socket (map dp_inj): local replies of the agent.
 *
 * Owner: NAME=timeout (K2 data path). Attached by fastpath/loader.py. The agent
 * (fastpath/timeouts.py) writes "<client cookie, 8 bytes LE><HTTP response>" to
 * its injector socket; this program pops the cookie and redirects the rest into
 * that client socket's receive queue (dp_cli, BPF_F_INGRESS), as if the
 * upstream had answered. The cookie travels with the bytes, so two injections
 * can never swap clients. A client that is gone: the write fails (SK_DROP).
 */

BPF_SOCKHASH(dp_inj, __u32, 8); /* slots: the INJECTOR_SLOT of each agent module */

int dp_inj_verdict(struct sk_msg_md *msg)
{
    if (msg->size <= 8 || bpf_msg_pull_data(msg, 0, 8, 0))
        return SK_DROP;
    void *d = msg->data;
    if (d + 8 > msg->data_end)
        return SK_DROP;
    __u64 ck = *(__u64 *)d;
    if (bpf_msg_pop_data(msg, 0, 8, 0))
        return SK_DROP;
    return dp_cli.msg_redirect_hash(msg, &ck, BPF_F_INGRESS);
}
