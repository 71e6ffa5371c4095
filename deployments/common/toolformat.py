"""MiniCPM-V 4.6's tool-call format, defined once: the streaming parser reads it (`deployments.ingress.tools`)
and the grammar of a constrained call writes it (`deployments.engine.grammar`).

The model writes a call as (the Qwen3-Coder format, which vLLM's and SGLang's `qwen3_coder` parsers read):

    <tool_call>
    <function=get_weather>
    <parameter=city>
    Paris
    </parameter>
    </function>
    </tool_call>
"""

CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
FUNCTION_OPEN, FUNCTION_CLOSE = "<function=", "</function>"  # the opening tag ends with the name and ">"
PARAMETER_OPEN, PARAMETER_CLOSE = "<parameter=", "</parameter>"
